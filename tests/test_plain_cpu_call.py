"""Tier 1: the screen that sends a plain eager CPU call of linear_act / linear_glu straight to the
cpu backend (fastnn/functional.py: _plain_call). It must admit only calls the general path would
run on the cpu backend's eager path, and give them the general path's bits. (Its CUDA calls are
tested on a GPU in tests/test_cuda.py.)"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastnn
from fastnn import functional as FN


def _inputs(dtype=torch.float32, rows=(6,), grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*rows, 10, generator=g).to(dtype).requires_grad_(grad)
    w = torch.nn.Parameter((torch.randn(12, 10, generator=g) / 3).to(dtype), requires_grad=grad)
    wu = torch.nn.Parameter((torch.randn(12, 10, generator=g) / 3).to(dtype), requires_grad=grad)
    b = (torch.randn(12, generator=g)).to(dtype).requires_grad_(grad)
    return x, w, wu, b


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def test_admits_plain_cpu_calls():
    x, w, wu, b = _inputs()
    assert FN._plain_call("auto", x, (w,), (b,)) == "cpu"
    assert FN._plain_call("cpu", x, (w, wu), (b, None)) == "cpu"
    assert FN._plain_call("auto", x.reshape(2, 3, 10), (w,), (None,)) == "cpu"
    assert FN._plain_call("auto", x[0], (w.detach(),), (b,)) == "cpu"


def test_plain_call_names_the_backend():
    """_plain_call: "cpu" for a plain CPU call; None where the general path decides, the cuda
    backend asked for on CPU tensors among them (the general path's error names it)."""
    x, w, wu, b = _inputs()
    assert FN._plain_call("auto", x, (w,), (b,)) == "cpu"
    assert FN._plain_call("cpu", x, (w, wu), (b, None)) == "cpu"
    assert FN._plain_call("cuda", x, (w,), (b,)) is None
    assert FN._plain_call("auto", x.double(), (w,), (b,)) is None
    assert FN._plain_call("cuda", x.to("meta"), (w.to("meta"),), (None,)) is None
    with pytest.raises(fastnn.BackendUnavailableError, match="cuda"):
        fastnn.linear_act(x, w, b, "gelu", backend="cuda")


def test_refuses_what_the_general_path_handles():
    x, w, wu, b = _inputs()
    refused = [
        ("torch", x, (w,), (b,)), ("triton", x, (w,), (b,)),  # another backend asked for
        ("auto", x.double(), (w,), (b,)), ("auto", x, (w,), (b.double(),)),  # dtypes differ
        ("auto", x.int(), (w.int(),), (None,)),  # not a float dtype
        ("auto", x.to("meta"), (w.to("meta"),), (None,)),  # not on the CPU
        ("auto", x[:, :9], (w,), (b,)), ("auto", x, (w,), (b[:11],)), ("auto", x, (w, wu[:11]), (b, None)),
        ("auto", x, (w[0],), (None,)), ("auto", x.sum(), (w,), (None,)),  # shapes
        ("auto", x.as_subclass(_Subclass), (w,), (b,)), ("auto", x, (w,), (b.as_subclass(_Subclass),)),
    ]
    for backend, *args in refused:
        assert FN._plain_call(backend, *args) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert FN._plain_call("auto", x, (w,), (b,)) is None
    with _Passthrough():
        assert FN._plain_call("auto", x, (w,), (b,)) is None
    screened = []
    torch.func.vmap(lambda r: screened.append(FN._plain_call("auto", r, (w,), (b,)) is not None) or r)(x)
    with torch.autograd.forward_ad.dual_level():
        screened.append(FN._plain_call("auto", x, (w,), (b,)) is not None)
    assert screened == [False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "identity", "swiglu"])
@pytest.mark.parametrize("bias", ["bias", "strided-bias", "no-bias"])
@pytest.mark.parametrize("rows", [(3, 70), (1,)], ids=["3x70-rows", "1-row"])
def test_same_bits_as_the_general_path(dtype, grad, activation, bias, rows):
    """The screened call against the same call through the torch.library op (the general path's
    route under compile and for tensor subclasses): output and gradients bit for bit. (Without a
    gradient, float32 and float64, and bfloat16 where oneDNN serves it, take the cpu backend's
    one-frame inference paths.)"""
    x, w, wu, b = _inputs(dtype, rows=rows, grad=grad)
    bu = b.detach() * 0.5 - 0.25  # (the up projection's bias, for the gated unit)
    if bias == "strided-bias":
        b, bu = (torch.stack([t.detach(), t.detach()], 1)[:, 0] for t in (b, bu))
    b, bu = (None, None) if bias == "no-bias" else (b.detach().requires_grad_(grad), bu.requires_grad_(grad))
    gated = activation in fastnn.GATED

    def ours(x, w, wu, b, bu):
        if gated:
            return fastnn.linear_glu(x, w, wu, b, bu, activation)
        return fastnn.linear_act(x, w, b, activation)

    def through_op(x, w, wu, b, bu):
        x2 = x.reshape(-1, x.shape[-1])
        if gated:
            y = torch.ops.fastnn.linear_glu_fwd(x2, w, wu, b, bu, activation, "cpu", grad)[0]
        else:
            y = torch.ops.fastnn.linear_act_fwd(x2, w, b, activation, "cpu", grad)[0]
        return y.reshape(*x.shape[:-1], -1)

    outs = []
    for fn in (ours, through_op):
        y = fn(x, w, wu, b, bu)
        leaves = [t for t in (x, w, wu, b) + ((bu,) if gated else ()) if t is not None]
        grads = torch.autograd.grad(y.float().square().sum(), leaves, allow_unused=True) if grad else ()
        outs.append((y, *grads))
    for a, c in zip(*outs):
        assert (a is None and c is None) or torch.equal(a, c)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("level", ["none", "activation"])
def test_mlp_same_bits_as_the_general_path(grad, activation, level):
    """fastnn.mlp's screened call against the general path's own choice for it: the block op with
    a gradient to give, fc1 then fc2 without."""
    x, w, wu, b = _inputs(torch.float32, rows=(3, 70), grad=grad)
    w2 = torch.nn.Parameter(torch.randn(7, 12) / 3, requires_grad=grad)
    b2 = torch.randn(7).requires_grad_(grad)
    gated = activation in fastnn.GATED
    up = wu if gated else None
    assert FN._plain_call("auto", x, (w, up) if gated else (w,), (b, None)) == "cpu"
    y = fastnn.mlp(x, w, b, w2, b2, activation, up_weight=up, recompute=level, training=False, dropout=0.5)
    if grad:
        ref = FN.MlpFunction.apply(x.reshape(-1, 10), w, b, up, None, w2, b2, activation, "cpu", level).reshape(3, 70, 7)
    else:
        h = (FN.linear_glu(x, w, wu, b, None, activation, backend="cpu") if gated
             else FN.linear_act(x, w, b, activation, backend="cpu"))
        ref = FN.linear_act(h, w2, b2, "identity", backend="cpu")
    assert torch.equal(y, ref)
    if grad:
        leaves = [t for t in (x, w, b, up, w2, b2) if t is not None]
        for a, c in zip(torch.autograd.grad(y.sum(), leaves), torch.autograd.grad(ref.sum(), leaves)):
            assert torch.equal(a, c)


def test_mlp_errors_still_raised():
    x, w, wu, b = _inputs()
    w2 = torch.randn(7, 12)
    with pytest.raises(ValueError, match="dropout probability"):
        fastnn.mlp(x, w, b, w2, None, "gelu", dropout=1.5, training=False)
    with pytest.raises(ValueError, match="up_weight / up_bias are for gated"):
        fastnn.mlp(x, w, b, w2, None, "gelu", up_bias=b)
    with pytest.raises(ValueError, match="needs up_weight"):
        fastnn.mlp(x, w, b, w2, None, "swiglu")
    with pytest.raises(ValueError, match="unknown recompute level"):
        fastnn.mlp(x, w, b, w2, None, "gelu", recompute="all")
    with pytest.raises(ValueError, match="in_features"):
        fastnn.mlp(x, w, b, torch.randn(7, 11), None, "gelu")
