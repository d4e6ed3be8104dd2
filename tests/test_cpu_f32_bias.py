"""Where float32's bias is added (fastnn/backends/cpu.py, f32_bias_in_pass): by the GEMM (addmm,
F.linear's bits) or, on Intel's CPUs, where MKL's addmm costs more than mm, by the pass that reads
the product anyway, for the smooth activations and up projections (relu's sign and the identity keep
the GEMM's). Both routes run here (FASTNN_CPU_F32_BIAS) and each must meet the numerics rule."""
import pytest
import torch
import torch.nn.functional as F

import fastnn
from fastnn import activations
from fastnn.backends import BACKENDS
from fastnn.backends import cpu as cpu_backend
from numerics import check_against_reference, make_inputs, torch_linear_act, torch_linear_glu

CPU = BACKENDS["cpu"]
ROUTES = ["gemm", "pass"]
SHAPES = [(5, 7, 9), (17, 33, 261), (100, 64, 700), (1, 40, 3)]


@pytest.fixture
def route(request, monkeypatch):
    monkeypatch.setattr(cpu_backend, "F32_BIAS_OVERRIDE", request.param)
    return request.param


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh", "relu", "identity"])
def test_linear_act(route, shape, activation):
    m, k, n = shape
    check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cpu"),
                            lambda x, w, b: torch_linear_act(x, w, b, activation),
                            list(make_inputs((m, k), n, torch.float32, "cpu")), what=f"{activation} {route}")


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("activation", ["swiglu", "reglu"])
def test_linear_glu(route, activation):
    check_against_reference(
        lambda x, wg, wu, bg, bu: fastnn.linear_glu(x, wg, wu, bg, bu, activation, backend="cpu"),
        lambda x, wg, wu, bg, bu: torch_linear_glu(x, wg, wu, bg, bu, activation),
        list(make_inputs((33, 40), 70, torch.float32, "cpu", glu=True)), what=f"{activation} {route}")


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("activation,level", [("gelu", "none"), ("gelu", "activation"), ("swiglu", "activation")])
def test_mlp(route, activation, level):
    gen = torch.Generator().manual_seed(0)
    gated = activation in fastnn.GATED
    t = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, w1, b1, w2, b2 = t(37, 24), t(50, 24), t(50), t(24, 50), t(24)
    wu, bu = (t(50, 24), t(50)) if gated else (None, None)
    params = [p for p in (x, w1, b1, w2, b2, wu, bu) if p is not None]
    dy = torch.randn(37, 24, generator=gen, dtype=torch.float64)

    def run(ps, backend):
        x, w1, b1, w2, b2, *up = ps
        return fastnn.mlp(x, w1, b1, w2, b2, activation, up_weight=up[0] if up else None,
                          up_bias=up[1] if up else None, recompute=level, backend=backend)

    ref = torch.autograd.grad(run(params, "torch"), params, dy)
    ours_params = [p.detach().float().requires_grad_() for p in params]
    y = run(ours_params, "cpu")
    ours = torch.autograd.grad(y, ours_params, dy.float())
    torch.testing.assert_close(y.double(), run(params, "torch").detach(), rtol=1e-4, atol=1e-4)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_where_the_bias_goes(route):
    x, w, b = make_inputs((64, 96), 80, torch.float32, "cpu", requires_grad=False)
    _, kept = CPU.linear_act_fwd(x, w, b, activations.get("gelu"), True)
    # the product the forward keeps: with the bias where the GEMM adds it, else without
    assert torch.equal(kept, torch.addmm(b, x, w.t()) if route == "gemm" else torch.mm(x, w.t()))
    # relu's pre-activation and the identity are F.linear's on both routes
    assert torch.equal(fastnn.linear_act(x, w, b, "relu", backend="cpu"), torch.relu(F.linear(x, w, b)))
    assert torch.equal(fastnn.linear_act(x, w, b, "identity", backend="cpu"), F.linear(x, w, b))
    assert CPU.backward_reads_bias(torch.float32, activations.get("gelu")) is (route == "pass")


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("activation", ["gelu", "swiglu", "reglu"])
def test_no_gradient_forward_has_the_training_forwards_bits(route, activation):
    gated = activation in fastnn.GATED
    x, *params = make_inputs((40, 48), 64, torch.float32, "cpu", requires_grad=False, glu=gated)
    fn = (lambda x, *p: fastnn.linear_glu(x, *p, activation, backend="cpu")) if gated else (
        lambda x, *p: fastnn.linear_act(x, *p, activation, backend="cpu"))
    with torch.no_grad():
        inference = fn(x, *params)
    training = fn(x.requires_grad_(), *params)
    assert torch.equal(inference, training.detach())


def test_route_choice(monkeypatch):
    monkeypatch.setattr(cpu_backend, "F32_BIAS_OVERRIDE", None)
    assert cpu_backend.f32_bias_in_pass() is cpu_backend._intel_cpu()
