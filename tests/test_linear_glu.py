"""Tier 1 (and tier 4 on a GPU): fastnn.linear_glu against PyTorch's composite and a float64
reference with the 2x error rule, on the native backends."""
import pytest
import torch

import fastnn
from cases import DTYPES, SHAPES, native_backend_params
from numerics import check_against_reference, make_inputs, torch_linear_glu

GATED = list(fastnn.GATED)
BACKEND_PARAMS = native_backend_params()


def _fn(activation, backend):
    return lambda x, wg, wu, bg, bu: fastnn.linear_glu(x, wg, wu, bg, bu, activation, backend=backend)


def _ref(activation):
    return lambda x, wg, wu, bg, bu: torch_linear_glu(x, wg, wu, bg, bu, activation)


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", GATED)
def test_matrix(backend, device, shape, dtype, activation):
    m, k, n = shape
    inputs = make_inputs((m, k), n, dtype, device, glu=True)
    check_against_reference(_fn(activation, backend), _ref(activation), list(inputs),
                            what=f"{backend} {activation} {dtype} {shape}")


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("lead", [(), (4,), (2, 3), (2, 1, 3)], ids=lambda s: f"{len(s) + 1}d")
def test_leading_dims_and_strides(backend, device, lead):
    x, wg, wu, bg, bu = make_inputs((*lead, 21), 10, torch.float32, device, glu=True)
    y = fastnn.linear_glu(x, wg, wu, bg, bu, "swiglu", backend=backend)
    assert y.shape == (*lead, 10)
    wg_t = wg.detach().t().contiguous().t().requires_grad_()  # transposed storage
    check_against_reference(_fn("geglu", backend), _ref("geglu"), [x, wg_t, wu, bg, bu], what="strides")


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("bias", ["none", "gate", "up", "both"])
def test_bias_combinations(backend, device, bias):
    x, wg, wu, bg, bu = make_inputs((12, 9), 7, torch.float32, device, glu=True)
    bg = bg if bias in ("gate", "both") else None
    bu = bu if bias in ("up", "both") else None
    check_against_reference(_fn("reglu", backend), _ref("reglu"), [x, wg, wu, bg, bu], what=bias)


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
def test_zero_rows(backend, device):
    x, wg, wu, bg, bu = make_inputs((0, 8), 5, torch.float32, device, glu=True)
    y = fastnn.linear_glu(x, wg, wu, bg, bu, backend=backend)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(bg.grad, torch.zeros(5, device=device)) and x.grad.shape == (0, 8)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_PARAMS if p.values[0] == "cpu"])
@pytest.mark.parametrize("activation", GATED)
def test_gradcheck_float64(backend, device, activation):
    inputs = make_inputs((5, 4), 3, torch.float64, device, glu=True)
    with torch.no_grad():
        x, wg, _, bg, _ = inputs
        z = torch.nn.functional.linear(x, wg, bg)
        bg += torch.where(z.abs().min(0).values < 1e-3, 0.1, 0.0)
    assert torch.autograd.gradcheck(_fn(activation, backend), inputs)


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
def test_partial_gradients(backend, device):
    x, wg, wu, bg, bu = make_inputs((6, 5), 4, torch.float32, device, requires_grad=False, glu=True)
    wu.requires_grad_()
    bg.requires_grad_()
    check_against_reference(_fn("swiglu", backend), _ref("swiglu"), [x, wg, wu, bg, bu], what="partial")
