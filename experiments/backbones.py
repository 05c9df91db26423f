"""Which backbone, and does fine-tuning it beat training only the head? Seven torchvision backbones, each frozen and unfrozen.

    python tune.py --space experiments/backbones.py --gpus-per-trial 0.25

A grid of 14 trials, pretrained on ImageNet (--no-pretrained to start from random weights).
"""
SPACE = {
    "backbone": ["resnet50", "resnet152", "efficientnet_b0", "efficientnet_b7", "densenet121", "vgg16", "alexnet"],
    "freeze": [False, True],
}
