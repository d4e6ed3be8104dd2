"""One bfloat16 row on oneDNN's AMX kernels: the cpu backend multiplies it by torch.mv / addmv
(fastnn/backends/cpu.py, _one_row_by_mv), where its probe finds their bits are mm's and addmm's.
Every one-row call gives the bits of the GEMM route (the mv route turned off), the kinked
activations F.linear's own pre-activation, and the route is taken where the probe allows it."""
import pytest
import torch
import torch.nn.functional as F

import fastnn
from fastnn.backends import cpu as cpu_backend

BF16 = torch.bfloat16
ROUTE_ON = cpu_backend._one_row_by_mv(BF16)
needs_route = pytest.mark.skipif(not ROUTE_ON, reason="one bfloat16 row runs as a GEMM here (no AMX, or the "
                                                      "mv probe disagreed)")
ACTS = ["gelu", "silu", "identity", "relu", "leaky_relu", "squared_relu"]
GATED = ["swiglu", "geglu", "reglu"]


def _inputs(k, n, bias, gated, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=gen).to(BF16)  # noqa: E731
    x, w, wu = t(1, k), t(n, k) / k ** 0.5, t(n, k) / k ** 0.5
    b, bu = (t(n), t(n)) if bias else (None, None)
    return (x, w, wu, b, bu) if gated else (x, w, b)


def _call(activation, inputs, route, monkeypatch):
    monkeypatch.setattr(cpu_backend, "_one_row_by_mv", lambda dtype: route and ROUTE_ON)
    if activation in fastnn.GATED:
        return fastnn.linear_glu(*inputs, activation=activation)
    return fastnn.linear_act(*inputs, activation=activation)


@needs_route
@pytest.mark.parametrize("activation", ACTS + GATED)
@pytest.mark.parametrize("k,n", [(1, 5), (2, 3), (768, 96), (33, 1)], ids=lambda s: str(s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_one_row_gives_the_gemm_routes_bits(activation, k, n, bias, monkeypatch):
    inputs = _inputs(k, n, bias, activation in fastnn.GATED)
    by_mv = _call(activation, inputs, True, monkeypatch)
    by_gemm = _call(activation, inputs, False, monkeypatch)
    assert torch.equal(by_mv, by_gemm)


@needs_route
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_one_row_kinked_activation_has_f_linear_pre_activation(activation):
    for k, n in ((1, 7), (2, 9), (768, 300)):
        x, w, b = _inputs(k, n, True, False)
        fn = F.relu if activation == "relu" else lambda z: F.leaky_relu(z, fastnn.activations.LEAKY_SLOPE)
        assert torch.equal(fastnn.linear_act(x, w, b, activation), fn(F.linear(x, w, b)))


@needs_route
def test_route_is_taken(monkeypatch):
    calls = []

    def counted(name):
        real = getattr(torch, name)
        return lambda *a, **kw: calls.append(name) or real(*a, **kw)

    for name in ("mv", "addmv"):
        monkeypatch.setattr(torch, name, counted(name))
    for activation, expect in (("gelu", "mv"), ("relu", "addmv"), ("swiglu", "mv")):
        calls.clear()
        inputs = _inputs(64, 32, True, activation in fastnn.GATED)
        if activation in fastnn.GATED:
            fastnn.linear_glu(*inputs, activation=activation)
        else:
            fastnn.linear_act(*inputs, activation=activation)
        assert expect in calls, (activation, calls)
    calls.clear()
    fastnn.linear_act(torch.randn(2, 64, dtype=BF16), torch.randn(32, 64, dtype=BF16), None, "gelu")
    assert calls == []  # two rows: the GEMM


def test_route_only_for_bfloat16_on_amx():
    assert not cpu_backend._one_row_by_mv(torch.float32)
    assert not cpu_backend._one_row_by_mv(torch.float16)
    if not cpu_backend._has_amx():
        assert not ROUTE_ON
