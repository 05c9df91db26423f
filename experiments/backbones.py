"""Which backbone, and does fine-tuning it beat training only the head? Seven torchvision backbones, frozen and not, and UNI frozen.

    python tune.py --space experiments/backbones.py --gpus-per-trial 0.25
    BREAKHIS_UNI_WEIGHTS=~/weights/uni.bin python tune.py --space experiments/backbones.py   # with UNI

A grid of 14 trials, pretrained on ImageNet (--no-pretrained to start from random weights), plus
`uni_frozen` when UNI's weights file is on this machine. UNI (timm:hf-hub:MahmoodLab/UNI, ViT-L/16,
CC-BY-NC-ND-4.0, gated) cannot be downloaded without accepting its licence, so the entry reads a
local file: BREAKHIS_UNI_WEIGHTS, or weights/uni.bin. Without it the entry is skipped, saying so.
"""
import os
import sys
from pathlib import Path

TORCHVISION = ("resnet50", "resnet152", "efficientnet_b0", "efficientnet_b7", "densenet121", "vgg16", "alexnet")
PRESETS = {f"{b}_{'frozen' if frozen else 'unfrozen'}": {"backbone": b, "freeze": frozen}
           for b in TORCHVISION for frozen in (False, True)}

UNI_WEIGHTS = os.path.expanduser(os.environ.get("BREAKHIS_UNI_WEIGHTS", "weights/uni.bin"))
if Path(UNI_WEIGHTS).is_file():
    # frozen: the foundation model's features are cached once; only the head trains
    PRESETS["uni_frozen"] = {"backbone": "timm:hf-hub:MahmoodLab/UNI", "weights": str(Path(UNI_WEIGHTS).resolve()),
                             "freeze": True}
else:
    print(f"experiments/backbones.py: skipping uni_frozen: no UNI weights at {UNI_WEIGHTS}. Accept the licence at "
          f"https://huggingface.co/MahmoodLab/UNI, run `huggingface-cli download MahmoodLab/UNI pytorch_model.bin`, "
          f"and set BREAKHIS_UNI_WEIGHTS to that file", file=sys.stderr)

SPACE = {"preset": list(PRESETS)}
