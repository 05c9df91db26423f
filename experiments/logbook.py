"""The logbook, rerun as one grid: each of its entries is a named preset.

    python tune.py --space experiments/logbook.py                 # every entry, ASHA stopping the weak ones
    python train.py --preset logbook:resnet50_frozen              # one entry alone

A preset lists only what differs from the logbook's best entry, which is train.py's default:
resnet152 pretrained and unfrozen, head 2048->1000->2 with dropout 0.5 before each linear layer,
AdamW lr 1e-4 weight decay 0.01, MultiStepLR at 10,30,50 gamma 0.1, class weights (0.5, 0.8),
patient-level split 60:10:30, 60 epochs.
"""
PRESETS = {
    "best": {},
    # backbones
    "resnet50_frozen": {"backbone": "resnet50", "freeze": True},
    "resnet50_unfrozen": {"backbone": "resnet50"},
    "efficientnet_b0": {"backbone": "efficientnet_b0"},
    "efficientnet_b7": {"backbone": "efficientnet_b7"},
    "densenet121": {"backbone": "densenet121"},
    "vgg16": {"backbone": "vgg16"},
    "alexnet": {"backbone": "alexnet"},
    # head 2048->1000->512->128->2 with three dropout layers of 0.5
    "deep_head": {"head": (1000, 512, 128), "dropout": (0.5, 0.5, 0.5)},
    # optimisers (the logbook gives no SGD learning rate; 1e-3 with momentum 0.9 is the usual start)
    "adam": {"optimizer": "adam", "weight_decay": 0.0},
    "sgd": {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4},
    # schedulers
    "step": {"scheduler": "step", "step_size": 10, "gamma": 0.1},
    "multistep_20_40_60": {"scheduler": "multistep", "milestones": (20, 40, 60)},
    "exponential": {"scheduler": "exponential", "gamma": 0.95},
    "onecycle": {"scheduler": "onecycle"},
    "plateau": {"scheduler": "plateau", "plateau_patience": 5, "plateau_factor": 0.1},
    # loss and split
    "equal_weights": {"class_weights": (0.5, 0.5)},
    "split_70_10_20": {"split_ratio": "70:10:20"},
}
SPACE = {"preset": list(PRESETS)}
