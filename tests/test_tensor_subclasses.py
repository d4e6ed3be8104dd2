"""Tensor subclasses fastnn's ops do not know: quantised weights (torchao's quantize_ puts them in
place on nn.Linear, before or after fastnn.fuse), nested (jagged) inputs. F.linear and the
activations are ATen ops such subclasses implement; fastnn's ops would reach their
__torch_dispatch__ unknown. backend="auto" runs PyTorch's composite for them, so functional calls
and fused models give what the unfused code gives. (Fake and functional tensors, torch.compile's
and torch.export's, and DTensor, whose sharding rules fastnn registers, still run fastnn's ops:
tests/test_compile.py, tests/test_export.py, tests/test_tensor_parallel.py.)"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnn
from fastnn import activations

aten = torch.ops.aten


class QuantizedWeight(torch.Tensor):
    """A weight kept as int8 values and a scale per output row, like torchao's: F.linear's
    transpose of it gives the dequantised matrix; any other op raises, as torchao's tensors do
    for the ops they do not implement."""

    @staticmethod
    def __new__(cls, q, scale):
        return torch.Tensor._make_wrapper_subclass(cls, q.shape, dtype=scale.dtype, device=q.device)

    def __init__(self, q, scale):
        self.q, self.scale = q, scale

    @classmethod
    def of(cls, w):
        scale = w.detach().abs().amax(dim=1).clamp_min(1e-8) / 127
        return cls(torch.round(w.detach() / scale[:, None]).to(torch.int8), scale)

    def dequantized(self):
        return self.q.to(self.scale.dtype) * self.scale[:, None]

    def __repr__(self):
        return f"QuantizedWeight({tuple(self.shape)})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (aten.detach.default, aten.alias.default):
            return cls(args[0].q, args[0].scale)
        if func is aten.t.default:
            return args[0].dequantized().t()
        raise NotImplementedError(f"QuantizedWeight does not implement {func}")


def _quantize_linears(model):
    for m in model.modules():
        if type(m) is nn.Linear:
            m.weight = nn.Parameter(QuantizedWeight.of(m.weight), requires_grad=False)
    return model


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "identity"])
def test_linear_act_with_a_quantized_weight(activation):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 24, requires_grad=True)
    w, b = QuantizedWeight.of(torch.randn(40, 24) / 5), torch.randn(40)
    y = fastnn.linear_act(x, w, b, activation)
    want = activations.get(activation).fn(F.linear(x, w.dequantized(), b))
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    (want_dx,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(dx, want_dx)


def test_linear_glu_and_mlp_with_quantized_weights():
    torch.manual_seed(0)
    x = torch.randn(9, 24)
    gw, uw, dw = (QuantizedWeight.of(torch.randn(*s) / 5) for s in ((32, 24), (32, 24), (24, 32)))
    gb, ub, db = torch.randn(32), torch.randn(32), torch.randn(24)
    h = F.silu(F.linear(x, gw.dequantized(), gb)) * F.linear(x, uw.dequantized(), ub)
    torch.testing.assert_close(fastnn.linear_glu(x, gw, uw, gb, ub, "swiglu"), h)
    torch.testing.assert_close(fastnn.mlp(x, gw, gb, dw, db, "swiglu", up_weight=uw, up_bias=ub),
                               F.linear(h, dw.dequantized(), db))
    # a plain fc1 and a quantised fc2 only: the subclass anywhere in the block
    w1 = torch.randn(32, 24) / 5
    torch.testing.assert_close(fastnn.mlp(x, w1, gb, dw, db, "gelu"),
                               F.linear(F.gelu(F.linear(x, w1, gb)), dw.dequantized(), db))


def test_a_named_backend_still_gets_the_subclass():
    """Only auto falls back: a backend asked for by name is handed the call as it is."""
    w = QuantizedWeight.of(torch.randn(8, 4))
    with pytest.raises(NotImplementedError, match="QuantizedWeight"):
        fastnn.linear_act(torch.randn(3, 4), w, None, "gelu", backend="cpu")


def _sequential():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.SiLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("order", ["quantize then fuse", "fuse then quantize"])
def test_fused_model_with_quantized_weights(order):
    reference = _quantize_linears(_sequential())
    model = _sequential()
    model = fastnn.fuse(_quantize_linears(model)) if order == "quantize then fuse" else _quantize_linears(
        fastnn.fuse(model))
    x = torch.randn(3, 5, 16, requires_grad=True)
    y, want = model(x), reference(x)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


def test_nested_jagged_input():
    torch.manual_seed(0)
    reference = _sequential()
    model = fastnn.fuse(copy.deepcopy(reference))
    parts = [torch.randn(3, 16), torch.randn(5, 16)]
    for m in (reference, model):
        x = torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True)
        y = m(x)
        y.values().square().sum().backward()
        m.result = y.values().detach(), [p.grad for p in m.parameters()]
    torch.testing.assert_close(model.result[0], reference.result[0])
    for g, want in zip(model.result[1], reference.result[1]):
        torch.testing.assert_close(g, want)
    x = torch.nested.nested_tensor([torch.randn(2, 16), torch.randn(4, 16)], layout=torch.jagged)
    w, b = reference[0].weight.detach(), reference[0].bias.detach()
    torch.testing.assert_close(fastnn.linear_act(x, w, b, "gelu").values(), F.gelu(F.linear(x, w, b)).values())


# ---- torchao's own quantisation, where installed ------------------------------------------------
@pytest.mark.parametrize("config", ["int8 weight-only", "int8 dynamic activation"])
@pytest.mark.parametrize("family", ["sequential", "llama", "bert"])
@pytest.mark.parametrize("order", ["quantize then fuse", "fuse then quantize"])
def test_torchao_quantize_(config, family, order):
    quantization = pytest.importorskip("torchao.quantization")
    cfg = {"int8 weight-only": quantization.Int8WeightOnlyConfig,
           "int8 dynamic activation": quantization.Int8DynamicActivationInt8WeightConfig}[config]()
    quantize_ = quantization.quantize_
    if family == "sequential":
        build, inputs = _sequential, dict(input=torch.randn(3, 5, 16))
    else:
        pytest.importorskip("transformers")
        from test_fuse import FAMILIES, _inputs

        def build():
            torch.manual_seed(0)
            return FAMILIES[family][0]().eval()

        inputs = _inputs(family)
    reference = build()
    quantize_(reference, cfg)
    model = build()
    if order == "quantize then fuse":
        quantize_(model, cfg)
        fastnn.fuse(model)
    else:
        fastnn.fuse(model)
        quantize_(model, cfg)
    assert any(r.fused for r in model.fastnn_fuse_report)
    with torch.no_grad():
        if family == "sequential":
            y, want = model(inputs["input"]), reference(inputs["input"])
        else:
            y, want = model(**inputs).logits, reference(**inputs).logits
    torch.testing.assert_close(y, want)
