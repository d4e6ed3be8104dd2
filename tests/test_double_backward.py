"""Gradients of gradients (create_graph=True): gradient penalties, second-order meta-learning,
Hessian-vector products. fastnn's kernels give no autograd graph of their own backward, so such a
backward runs PyTorch's composite (fastnn/autograd.py); these tests check that the second
derivatives are right (gradgradcheck in float64, and against the unfused composite), on every
backend this machine runs and through the modules and fastnn.fuse, and that the one case the
composite cannot serve raises instead of returning a wrong number."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradgradcheck

import fastnn
from fastnn.backends import triton as triton_backend
from numerics import torch_linear_act, torch_linear_glu


def _f64(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_()


@pytest.mark.parametrize("activation", list(fastnn.ACTIVATIONS))
def test_linear_act_gradgradcheck(activation):
    x, w, b = _f64(4, 5), _f64(3, 5), _f64(3)
    gradgradcheck(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cpu"), (x, w, b))


@pytest.mark.parametrize("activation", list(fastnn.GATED))
def test_linear_glu_gradgradcheck(activation):
    x, wg, wu, bg, bu = _f64(4, 5), _f64(3, 5), _f64(3, 5), _f64(3), _f64(3)
    gradgradcheck(lambda *a: fastnn.linear_glu(*a, activation, backend="cpu"), (x, wg, wu, bg, bu))


@pytest.mark.parametrize("level", ["none", "activation", "fc1"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_mlp_gradgradcheck(activation, level):
    gated = activation in fastnn.GATED
    x, w1, b1, w2, b2 = _f64(4, 5), _f64(6, 5), _f64(6), _f64(5, 6), _f64(5)
    extra = (_f64(6, 5), _f64(6)) if gated else ()

    def block(x, w1, b1, w2, b2, *up):
        return fastnn.mlp(x, w1, b1, w2, b2, activation, up_weight=up[0] if up else None,
                          up_bias=up[1] if up else None, recompute=level, backend="cpu")

    gradgradcheck(block, (x, w1, b1, w2, b2, *extra))


def test_mlp_with_only_the_output_bias_trained():
    """create_graph=True where fc2's bias alone needs a gradient (BitFit-style): nothing else to
    differentiate."""
    x, w1, w2 = (torch.randn(*shape, dtype=torch.float64) for shape in ((4, 5), (6, 5), (5, 6)))
    b2 = _f64(5)
    g, = torch.autograd.grad(fastnn.mlp(x, w1, None, w2, b2, "gelu", backend="cpu").square().sum(), b2,
                             create_graph=True)
    want, = torch.autograd.grad(F.linear(F.gelu(F.linear(x, w1)), w2, b2).square().sum(), b2, create_graph=True)
    torch.testing.assert_close(g, want)
    torch.testing.assert_close(torch.autograd.grad(g.sum(), b2)[0], torch.autograd.grad(want.sum(), b2)[0])


def _penalty_grads(forward, x, params):
    """A WGAN-GP style gradient penalty: the parameters' gradients of (|d out / d x| - 1)^2."""
    out = forward(x)
    gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
    penalty = ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean()
    # (a bias after the last nonlinearity has no say in d out / d x: a zero gradient)
    return torch.autograd.grad(penalty, params, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_penalty_matches_the_composite(dtype):
    """Float32 and bfloat16 through the fused ops against the same model in PyTorch ops."""
    torch.manual_seed(1)
    w, b = (torch.randn(16, 8) / 3).to(dtype).requires_grad_(), torch.randn(16).to(dtype).requires_grad_()
    wg, wu = [(torch.randn(16, 8) / 3).to(dtype).requires_grad_() for _ in range(2)]
    w2 = (torch.randn(8, 16) / 4).to(dtype).requires_grad_()
    params = [w, b, wg, wu, w2]
    x = torch.randn(6, 8).to(dtype).requires_grad_()

    def fused(x):
        return (fastnn.linear_act(x, w, b, "gelu").sum(1) + fastnn.linear_glu(x, wg, wu).sum(1)
                + fastnn.mlp(x, w, b, w2, None, "silu").sum(1))

    def composite(x):
        return (torch_linear_act(x, w, b, "gelu").sum(1) + torch_linear_glu(x, wg, wu, None, None, "swiglu").sum(1)
                + F.linear(F.silu(F.linear(x, w, b)), w2).sum(1))

    tol = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    for got, want in zip(_penalty_grads(fused, x, params), _penalty_grads(composite, x, params)):
        torch.testing.assert_close(got, want, **tol)


def test_modules_and_fuse_give_second_derivatives():
    """FusedLinear, FusedMLP and a fused nn.Sequential against the same parameters in PyTorch ops."""
    torch.manual_seed(2)
    lin = fastnn.FusedLinear(8, 12, activation="tanh").double()
    mlp = fastnn.FusedMLP(8, 12, activation="gelu").double()
    seq = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.GELU(), torch.nn.Linear(12, 4),
                              torch.nn.Tanh()).double()
    seq_reference = copy.deepcopy(seq)
    fastnn.fuse(seq)
    assert [r.fused for r in seq.fastnn_fuse_report] == [True, True]
    cases = [(lin, lambda x: torch.tanh(F.linear(x, lin.weight, lin.bias))),
             (mlp, lambda x: mlp.fc2(F.gelu(mlp.fc1(x)))),
             (seq, seq_reference)]
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    for model, reference in cases:
        got = _penalty_grads(model, x, list(model.parameters()))
        params = list(model.parameters()) if reference is not seq_reference else list(seq_reference.parameters())
        want = _penalty_grads(reference, x, params)
        assert sum(g.abs().sum() for g in got) > 0
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_hessian_vector_product_in_weights():
    """Second order in the weights alone, x not requiring grad (MAML, Hessian-based optimisers)."""
    w, b = _f64(6, 4), _f64(6)
    x = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(6, 4, dtype=torch.float64)

    def hvp(fn):
        gw, = torch.autograd.grad(fn(x, w, b).pow(2).sum(), w, create_graph=True)
        return torch.autograd.grad((gw * v).sum(), (w, b))

    for got, want in zip(hvp(lambda x, w, b: fastnn.linear_act(x, w, b, "silu", backend="cpu")),
                         hvp(lambda x, w, b: F.silu(F.linear(x, w, b)))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_frozen_weight_double_backward_raises():
    """With a frozen weight the forward keeps no x (as F.linear), and the composite needs it: a
    clear error, never a second derivative missing its path through z."""
    w = torch.randn(6, 4, dtype=torch.float64)
    x = _f64(3, 4)
    y = fastnn.linear_act(x, w, None, "gelu", backend="cpu")
    with pytest.raises(RuntimeError, match="did not keep x"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    # first-order gradients are unaffected
    g, = torch.autograd.grad(fastnn.linear_act(x, w, None, "gelu", backend="cpu").pow(2).sum(), x)
    torch.testing.assert_close(g, torch.autograd.grad(F.gelu(F.linear(x, w)).pow(2).sum(), x)[0])


@pytest.mark.skipif(triton_backend.IMPORT_ERROR is not None, reason="triton not usable")
def test_triton_backend_second_derivatives():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    x = torch.randn(5, 16, device=device, requires_grad=True)
    w = (torch.randn(32, 16, device=device) / 4).requires_grad_()
    b = torch.randn(32, device=device, requires_grad=True)
    wu = (torch.randn(32, 16, device=device) / 4).requires_grad_()
    got = _penalty_grads(lambda x: fastnn.linear_act(x, w, b, "gelu", backend="triton").sum(1)
                         + fastnn.linear_glu(x, w, wu, b, None, backend="triton").sum(1), x, [w, b, wu])
    want = _penalty_grads(lambda x: torch_linear_act(x, w, b, "gelu").sum(1)
                          + torch_linear_glu(x, w, wu, b, None, "swiglu").sum(1), x, [w, b, wu])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
