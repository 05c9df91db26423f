"""kaiko-ai eva's BreakHis benchmark as presets (docs/eva.md; the protocol: breakhis/protocol.py).

    python train.py --protocol eva --backbone timm:hf-hub:MahmoodLab/UNI --weights uni.bin   # "protocol", applied by --protocol eva
    python train.py --protocol eva --preset eva:binary --backbone resnet50                   # benign / malignant, same images
    python train.py --protocol eva --magnification 100 --backbone resnet50                   # another magnification
    python train.py --protocol eva --preset eva:sweep --backbone resnet50                    # lr x weight decay, on validation
    python train.py --demo --protocol eva                                                    # a generated tree, ~1 min on a CPU

"protocol" holds eva's settings, each from its source (configs/vision/pathology/offline/classification/
breakhis.yaml; src/eva/vision/data/transforms/common/resize_and_crop.py; breakhis/probe.py lists the
probe's): the short side resized to 224 and the centre 224 square kept (protocol.eva_inputs caches
224x340 fields, whose central square is eva's crop), no augmentation, one linear layer, AdamW lr 3e-4 with torch's default weight
decay 0.01, batches of 256, 12,500 steps at most, patience 500 epochs, plain cross-entropy. The held-out
rows split the same images 50:25:25 by accession. The backbone's own mean and std are used (eva's config
takes them from the environment per model; ImageNet's by default).
"""
PROTOCOL = {
    "protocol": "eva", "task": "subtype", "magnification": "40", "freeze": True, "feature_cache": True,
    "augment": False, "image_size": 224, "head": (), "dropout": (), "class_weights": (),
    "label_smoothing": 0.0, "optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.01, "batch_size": 256,
    "drop_last": False, "probe_steps": 12500, "patience": 500, "split_ratio": "50:25:25", "group": "accession",
}
PRESETS = {
    "protocol": PROTOCOL,
    "binary": {**PROTOCOL, "task": "binary"},
    "all_magnifications": {**PROTOCOL, "magnification": "all"},
    # the probe's learning rate and weight decay swept per model, each probe choosing on its validation patients
    # (eva's row then chooses on the 14 patients it is scored on: its selection grows with the grid)
    "sweep": {**PROTOCOL, "probe_lrs": (1e-4, 3e-4, 1e-3, 3e-3), "probe_weight_decays": (0.0, 1e-4, 1e-2, 1e-1)},
}
