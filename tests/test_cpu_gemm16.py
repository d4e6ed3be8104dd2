"""Tier 1: the cpu backend's two routes for bfloat16 / float16 GEMMs (fastnn/backends/cpu.py):
torch's own 16-bit GEMM where oneDNN has native kernels for the CPU, and float32 GEMMs (exact
conversions, one rounding) where it would fall back to a slow reference loop. Both routes are run
on every machine through FASTNN_CPU_GEMM16, and each must meet the numerics rule."""
import pytest
import torch

import fastnn
from fastnn.backends import cpu as cpu_backend
from numerics import check_against_reference, make_inputs, torch_linear_act, torch_linear_glu

ROUTES = ["native", "float32"]
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def route(request, monkeypatch):
    monkeypatch.setenv("FASTNN_CPU_GEMM16", request.param)
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


def test_route_follows_onednn(monkeypatch):
    monkeypatch.delenv("FASTNN_CPU_GEMM16", raising=False)
    for has_native in (True, False):
        monkeypatch.setattr(cpu_backend, "_onednn_has", lambda dtype, has=has_native: has)
        assert cpu_backend.gemm_in_float32(torch.bfloat16) is (not has_native)
        assert cpu_backend.gemm_in_float32(torch.float16) is (not has_native)
        assert cpu_backend.gemm_in_float32(torch.float32) is False
