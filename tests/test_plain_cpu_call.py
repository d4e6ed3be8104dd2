"""Tier 1: the screen that sends a plain eager CPU call of linear_act / linear_glu straight to the
cpu backend (fastnn/functional.py: _plain_cpu_call). It must admit only calls the general path
would run on the cpu backend's eager path, and give them the general path's bits."""
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
    assert FN._plain_cpu_call("auto", x, (w,), (b,))
    assert FN._plain_cpu_call("cpu", x, (w, wu), (b, None))
    assert FN._plain_cpu_call("auto", x.reshape(2, 3, 10), (w,), (None,))
    assert FN._plain_cpu_call("auto", x[0], (w.detach(),), (b,))


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
        assert not FN._plain_cpu_call(backend, *args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not FN._plain_cpu_call("auto", x, (w,), (b,))
    with _Passthrough():
        assert not FN._plain_cpu_call("auto", x, (w,), (b,))
    screened = []
    torch.func.vmap(lambda r: screened.append(FN._plain_cpu_call("auto", r, (w,), (b,))) or r)(x)
    with torch.autograd.forward_ad.dual_level():
        screened.append(FN._plain_cpu_call("auto", x, (w,), (b,)))
    assert screened == [False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_same_bits_as_the_general_path(dtype, grad, activation):
    """The screened call against the same call through the torch.library op (the general path's
    route under compile and for tensor subclasses): output and gradients bit for bit."""
    x, w, wu, b = _inputs(dtype, rows=(3, 70), grad=grad)
    gated = activation in fastnn.GATED

    def ours(x, w, wu, b):
        if gated:
            return fastnn.linear_glu(x, w, wu, b, None, activation)
        return fastnn.linear_act(x, w, b, activation)

    def through_op(x, w, wu, b):
        x2 = x.reshape(-1, x.shape[-1])
        if gated:
            y = torch.ops.fastnn.linear_glu_fwd(x2, w, wu, b, None, activation, "cpu", grad)[0]
        else:
            y = torch.ops.fastnn.linear_act_fwd(x2, w, b, activation, "cpu", grad)[0]
        return y.reshape(*x.shape[:-1], -1)

    outs = []
    for fn in (ours, through_op):
        y = fn(x, w, wu, b)
        grads = torch.autograd.grad(y.float().square().sum(), (x, w, wu, b), allow_unused=True) if grad else ()
        outs.append((y, *grads))
    for a, c in zip(*outs):
        assert (a is None and c is None) or torch.equal(a, c)
