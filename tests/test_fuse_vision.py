"""fastnn.fuse on the MLPs of the vision libraries: timm's Mlp, GluMlp and SwiGLU, torchvision's
MLP (an nn.Sequential) and a timm ViT end to end, against the unfused module in outputs and every
gradient, fused or left with a reason. The libraries must import here: the PyPI torchvision wheel
is a CUDA build and does not load beside a CPU-only torch (timm imports torchvision), so these run
in an environment with the CUDA build of torch (it runs on CPU too) and are skipped elsewhere."""
import copy

import pytest
import torch
from torch import nn

import fastnn
from fused_calls import fused_calls  # noqa: F401  (fixture)


def _importable(name):
    try:
        return __import__(name)
    except Exception:  # noqa: BLE001 -- ImportError, or torchvision's own failure to load its ops
        return None


timm = _importable("timm")
torchvision = _importable("torchvision")
need_timm = pytest.mark.skipif(timm is None, reason="timm does not import here (it needs a loadable torchvision)")
need_torchvision = pytest.mark.skipif(torchvision is None, reason="torchvision does not import here")


def _outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = model(x)
    y.float().square().sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


def _check(module, x, fused_calls, fused=True, atol=2e-5):
    reference = copy.deepcopy(module)
    fastnn.fuse(module)
    report = module.fastnn_fuse_report
    assert any(r.fused for r in report) == fused, report
    for a, b in zip(_outputs_and_grads(reference, x), _outputs_and_grads(module, x)):
        torch.testing.assert_close(b, a, atol=atol, rtol=atol)
    assert (sum(fused_calls.values()) > 0) == fused
    return report


@need_timm
@pytest.mark.parametrize("act_layer,fused", [(nn.GELU, True), (nn.ReLU, True), (nn.SiLU, True),
                                             (nn.Hardswish, False)], ids=lambda v: getattr(v, "__name__", str(v)))
def test_timm_mlp(act_layer, fused, fused_calls):
    from timm.layers import Mlp

    report = _check(Mlp(24, 96, 20, act_layer=act_layer, norm_layer=nn.LayerNorm), torch.randn(3, 7, 24),
                    fused_calls, fused)
    if not fused:
        assert "no fastnn equivalent" in report[0].detail


@need_timm
@pytest.mark.parametrize("act_name,fastnn_name", [("gelu", "gelu"), ("gelu_tanh", "gelu_tanh"),
                                                  ("quick_gelu", "quick_gelu"), ("sigmoid", "sigmoid"),
                                                  ("tanh", "tanh")])
def test_timm_mlp_timm_activations(act_name, fastnn_name, fused_calls):
    """timm's own activation classes, which get_act_layer gives for these names (ConvNeXt, MaxViT,
    CoAtNet and GCViT ask for "gelu" or "gelu_tanh" by name)."""
    from timm.layers import Mlp, get_act_layer

    act_layer = get_act_layer(act_name)
    assert act_layer.__module__ == "timm.layers.activations"  # (not torch's class)
    report = _check(Mlp(24, 96, 20, act_layer=act_layer), torch.randn(3, 7, 24), fused_calls)
    assert f"fc1 + {fastnn_name} fused" in report[0].detail


@need_timm
@pytest.mark.parametrize("name", ["test_convnext", "test_maxvit"])
def test_timm_models_with_timm_activations(name, fused_calls):
    model = timm.create_model(name, pretrained=False, num_classes=5).eval()
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    report = _check(model, x, fused_calls, atol=1e-4)
    assert sum(r.fused for r in report) >= 2


@need_timm
def test_timm_vit_torch_jit_script(fused_calls):
    """timm's own test (test_model_forward_torchscript) scripts its models: a fused one scripts to
    torch's unfused model, with the same outputs."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5,
                              depth=2).eval()
    reference = copy.deepcopy(model)
    fastnn.fuse(model)
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), reference(x))
        torch.testing.assert_close(model(x), reference(x))


@need_timm
@pytest.mark.parametrize("gate_last", [True, False])
@pytest.mark.parametrize("act_layer", [nn.SiLU, nn.GELU])
def test_timm_glu_mlp(gate_last, act_layer, fused_calls):
    from timm.layers import GluMlp

    _check(GluMlp(24, 96, 20, act_layer=act_layer, gate_last=gate_last), torch.randn(5, 24), fused_calls)


@need_timm
def test_timm_glu_mlp_sigmoid_gate_left(fused_calls):
    from timm.layers import GluMlp  # its default act_layer, nn.Sigmoid: the classic GLU, no fastnn gate

    report = _check(GluMlp(24, 96, 20), torch.randn(5, 24), fused_calls, fused=False)
    assert "no fastnn equivalent" in report[0].detail


@need_timm
def test_timm_swiglu(fused_calls):
    from timm.layers import SwiGLU

    _check(SwiGLU(24, 64, 20, norm_layer=nn.LayerNorm), torch.randn(2, 9, 24), fused_calls)


@need_timm
def test_timm_vit_end_to_end(fused_calls):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5,
                              depth=2)
    model.eval()
    report = _check(model, torch.randn(2, 3, 32, 32), fused_calls, atol=1e-4)
    assert sum(r.fused for r in report) == 2  # each block's Mlp


@need_torchvision
def test_torchvision_mlp(fused_calls):
    from torchvision.ops import MLP

    module = MLP(24, [96, 48, 20], activation_layer=nn.GELU, dropout=0.0)
    report = _check(module, torch.randn(4, 24), fused_calls)
    assert sum(r.fused for r in report) == 2  # the two hidden Linear + GELU pairs; the last Linear has none
    normed = MLP(24, [96, 20], norm_layer=nn.LayerNorm)  # Linear -> LayerNorm -> ReLU: nothing to fuse
    fastnn.fuse(normed)
    assert not any(r.fused for r in normed.fastnn_fuse_report)
