"""Tier 1: the cpu backend's two routes for bfloat16 / float16 GEMMs (fastnn/backends/cpu.py):
torch's own 16-bit GEMM where oneDNN has native kernels for the CPU, and float32 GEMMs (exact
conversions, one rounding) where it would fall back to a slow reference loop. Both routes are run
on every machine through GEMM16_OVERRIDE (FASTNN_CPU_GEMM16), and each must meet the numerics rule."""
import os
import subprocess
import sys

import pytest
import torch

import torch.nn.functional as F

import fastnn
from fastnn import activations
from fastnn.backends import cpu as cpu_backend
from numerics import check_against_reference, make_inputs, torch_linear_act, torch_linear_glu

ROUTES = ["native", "float32"]
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def route(request, monkeypatch):
    monkeypatch.setattr(cpu_backend, "GEMM16_OVERRIDE", request.param)
    return request.param


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
def test_linear_act_routes(route, dtype, activation):
    assert cpu_backend.gemm_in_float32(dtype) == (route == "float32")
    x, w, b = make_inputs((37, 65), 47, dtype, "cpu")
    check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cpu"),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b],
                            what=f"{route} {activation} {dtype}")


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "reglu"])
def test_linear_glu_routes(route, dtype, activation):
    x, wg, wu, bg, bu = make_inputs((37, 65), 47, dtype, "cpu", glu=True)
    check_against_reference(
        lambda x, wg, wu, bg, bu: fastnn.linear_glu(x, wg, wu, bg, bu, activation, backend="cpu"),
        lambda x, wg, wu, bg, bu: torch_linear_glu(x, wg, wu, bg, bu, activation), [x, wg, wu, bg, bu],
        what=f"{route} {activation} {dtype}")


@pytest.mark.parametrize("route", ["float32"], indirect=True)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_route_rounds_once(route, dtype):
    # identity: y is the float32 product plus bias rounded once, bit for bit; the native route
    # rounds the product and then the sum, and differs in some elements
    x, w, b = make_inputs((64, 96), 80, dtype, "cpu", requires_grad=False)
    y = fastnn.linear_act(x, w, b, "identity", backend="cpu")
    assert torch.equal(y, torch.addmm(b.float(), x.float(), w.float().t()).to(dtype))


@pytest.mark.parametrize("route", ["native"], indirect=True)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("onednn_linear", [True, False], ids=["onednn-linear", "addmm"])
def test_native_route_bias(route, dtype, onednn_linear, monkeypatch):
    """The kinked activations' GEMM adds the bias: F.linear's own pre-activation, bit for bit,
    through oneDNN's linear where its probe passes and addmm elsewhere. The smooth ones add it in
    float to the rounded product, in the pass (and again in backward)."""
    if onednn_linear and not cpu_backend._onednn_linear_exact(dtype):
        pytest.skip(f"oneDNN's linear does not serve {dtype} on this machine")
    monkeypatch.setattr(cpu_backend, "_onednn_linear_exact", lambda d: onednn_linear)
    be = fastnn.backends.BACKENDS["cpu"]
    x, w, b = make_inputs((64, 96), 80, dtype, "cpu", requires_grad=False)
    z = F.linear(x, w, b)
    assert torch.equal(fastnn.linear_act(x, w, b, "relu", backend="cpu"), torch.relu(z))
    _, z_gate, z_up = be.linear_glu_fwd(x, w, w.flip(0), b, b.flip(0), activations.get_gated("reglu"), True)
    assert torch.equal(z_gate, z) and torch.equal(z_up, torch.mm(x, w.flip(0).t()))  # up: bias in the pass
    assert torch.equal(be.linear_act_fwd(x, w, b, activations.get("gelu"), True)[1], torch.mm(x, w.t()))
    assert torch.equal(fastnn.linear_act(x, w, b, "identity", backend="cpu"),
                       (torch.mm(x, w.t()).float() + b.float()).to(dtype))
    for activation in ("gelu", "relu", "leaky_relu"):
        check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cpu"),
                                lambda x, w, b: torch_linear_act(x, w, b, activation), list(make_inputs(
                                    (37, 65), 47, dtype, "cpu")), what=f"{activation} {dtype}")


def test_route_follows_onednn(monkeypatch):
    monkeypatch.setattr(cpu_backend, "GEMM16_OVERRIDE", None)
    for has_native in (True, False):
        monkeypatch.setattr(cpu_backend, "_onednn_has", lambda dtype, has=has_native: has)
        assert cpu_backend.gemm_in_float32(torch.bfloat16) is (not has_native)
        assert cpu_backend.gemm_in_float32(torch.float16) is (not has_native)
        assert cpu_backend.gemm_in_float32(torch.float32) is False


def test_onednn_linear_probe_ignores_the_callers_autocast():
    """The probe runs once, on the first call, whatever that call runs under."""
    probe = cpu_backend._onednn_linear_exact
    probe.cache_clear()
    try:
        # (an autocast to the other 16-bit type would cast the probe's addmm and fail it)
        with torch.autocast("cpu", dtype=torch.float16):
            under_autocast = [probe(torch.bfloat16)]
        probe.cache_clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast.append(probe(torch.float16))
        probe.cache_clear()
        assert under_autocast == [probe(dtype) for dtype in HALF]
    finally:
        probe.cache_clear()


def test_env_overrides_are_read_at_import(tmp_path):
    """FASTNN_CPU_GEMM16, FASTNN_CPU_PRODUCT and FASTNN_CPU_WGRAD, as a user sets them before starting
    Python."""
    code = ("import torch; from fastnn.backends import cpu; "
            "print(cpu.gemm_in_float32(torch.bfloat16), cpu.product_transposed(10**6, torch.float32, True), "
            "cpu.wgrad_from_copy(torch.float32, 1))")
    for gemm16, product, wgrad, expected in (("float32", "transposed", "copy", "True True True"),
                                             ("native", "direct", "view", "False False False")):
        env = dict(os.environ, FASTNN_CPU_GEMM16=gemm16, FASTNN_CPU_PRODUCT=product, FASTNN_CPU_WGRAD=wgrad)
        # away from the repository root, whose unbuilt fastnn/ would shadow the installed one
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected, (gemm16, product, wgrad, proc.stdout)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_row_views_of_wider_tensors(dtype, monkeypatch):
    """x[:, :k] of a wider tensor whose other columns hold NaN: torch 2.13's bfloat16 mm on a Xeon
    with AMX read them and returned NaN (F.linear too); fastnn's forward must give what it gives for
    the same values made contiguous, and its gradients the same. (The direct orientation: the
    transposed one reads x as the second factor, which that mm reads correctly.)"""
    monkeypatch.setattr(cpu_backend, "PRODUCT_OVERRIDE", "direct")
    torch.manual_seed(0)
    full = torch.full((512, 128), float("nan"), dtype=dtype)
    x = full[:, :100]
    x.copy_(torch.randn(512, 100).to(dtype))
    w, b = (torch.randn(64, 100) / 10).to(dtype), torch.randn(64).to(dtype)
    y = fastnn.linear_act(x, w, b, "gelu", backend="cpu")
    assert torch.equal(y, fastnn.linear_act(x.contiguous(), w, b, "gelu", backend="cpu"))
    grads = []
    for inp in (full.clone()[:, :100], x.contiguous()):
        inp.requires_grad_()
        wg = w.clone().requires_grad_()
        fastnn.linear_act(inp, wg, b, "gelu", backend="cpu").float().sum().backward()
        grads.append((inp.grad, wg.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
