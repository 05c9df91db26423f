"""Device settings: AMP dtypes, grad scaling, channels-last and compile preparation."""
import pytest
import torch

from breakhis.device import amp_dtype, needs_grad_scaler, prepare_model
from breakhis.errors import UserError
from breakhis.models import build_model


def test_amp_dtype_on_cpu():
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None
    assert amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        amp_dtype("fp16", cpu)
    with pytest.raises(UserError, match="auto, bf16, fp16, off"):
        amp_dtype("fp8", cpu)
    assert needs_grad_scaler(torch.float16) and not needs_grad_scaler(torch.bfloat16) and not needs_grad_scaler(None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_dtype_on_cuda():
    dev = torch.device("cuda")
    assert amp_dtype("auto", dev) is (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert amp_dtype("fp16", dev) is torch.float16


def test_prepare_model_keeps_state_dict_keys():
    model = build_model("resnet18", head=(), dropout=(), pretrained=False)
    keys = list(model.state_dict())
    out = prepare_model(model, torch.device("cpu"), channels_last=True, compile=True)
    assert out is model and list(model.state_dict()) == keys
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
