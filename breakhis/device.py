"""Where and how fast a model runs: the device, mixed precision, channels-last, compile, seeds.

    device = resolve_device("auto")               # cuda when visible, else cpu
    amp = amp_dtype("auto", device)               # bf16 / fp16 on a GPU, None (fp32) on the CPU
    with autocast(device, amp): logits = model(x)
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from .errors import UserError


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for dtype, or a disabled one for full fp32 (dtype None)."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (initialisation and dropout; the loader seeds its own draws)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for --amp: None means full fp32.

    'auto': bf16 on a CUDA device that supports it, fp16 on older CUDA devices, off on the CPU
    (CPU autocast is rarely faster). 'bf16' is allowed on the CPU; 'fp16' needs a CUDA device
    (UserError otherwise), as does bf16 support on a GPU.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if amp == "off":
        return None
    if amp == "auto":
        if not cuda:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; use --amp fp16 or auto")
        return torch.bfloat16
    if amp == "fp16":
        if not cuda:
            raise UserError(f"--amp fp16 needs a CUDA device (this run is on {device}); use --amp bf16 or off")
        return torch.float16
    raise UserError(f"--amp {amp!r}: choose one of auto, bf16, fp16, off")


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return dtype == torch.float16


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool, compile: bool,
                  compile_mode: str = "default") -> nn.Module:
    """Move the model to the device, optionally channels-last and compiled, and tune CUDA.

    Compiling is done in place (nn.Module.compile), so the returned module is `model` itself
    and its state_dict keys stay the same. Inputs should then be channels-last too.
    """
    device = torch.device(device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv algorithms once
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    if compile:
        model.compile(mode=compile_mode)
    return model


def resolve_device(name: str) -> torch.device:
    """auto (cuda if visible, else cpu), cpu, cuda or cuda:N; a missing GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible on this machine; use --device cpu")
    return dev
