"""Each activation's definitions agree: the C++ functors (through the same instantiations the
CPU kernels use) against the Python reference in fastnn/activations.py, and the Python reference
derivative against autograd of the Python reference function."""
import math

import pytest
import torch

import fastnn
from fastnn import _native, activations
from numerics import (SPECIAL, STABLE, activation_grid, assert_special_values, float32_math_problems,
                      rounded_16bit_problems, stable_reference)

ACTS = list(fastnn.ACTIVATIONS.values())


def test_stable_forms_equal_reference():
    z = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    for name, fn in STABLE.items():
        torch.testing.assert_close(fn(z), activations.get(name).fn(z), rtol=1e-13, atol=1e-15)


def native_eval(act, z, code=None):
    """act(z) and act'(z) from the C++ functors; `code` a 16-bit dtype's code for the float math its
    kernels use (z float32)."""
    C = _native.cpu_module()
    out, dout = torch.empty_like(z), torch.empty_like(z)
    code = _native.DTYPE_CODES[z.dtype] if code is None else code
    C.cpu_eval_activation(code, act.code, z.numel(), z.data_ptr(), out.data_ptr(), dout.data_ptr())
    return out, dout


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_reference_derivative_is_autograd_of_reference(act):
    z = activation_grid(torch.float64).requires_grad_()
    (g,) = torch.autograd.grad(act.fn(z).sum(), z)
    ref = act.grad(z.detach())
    away_from_kink = z.detach().abs() > 1e-12
    torch.testing.assert_close(ref[away_from_kink], g[away_from_kink], rtol=1e-10, atol=1e-12)


# gelu's value from Python's scalar libm erfc, a third opinion for a failure message
_SCALAR_GELU = {"gelu": lambda v: 0.5 * v * math.erfc(-v / math.sqrt(2))}


def _libm_opinion(act, z, out, ref):
    """Which of the two disagrees with libm, point by point (a mismatch seen once in CI, on the
    avx512 build, that did not come back in 95 reruns: this says which side to look at)."""
    scalar = _SCALAR_GELU.get(act.name)
    if scalar is None:
        return ""
    third = torch.tensor([scalar(v) for v in z.tolist()], dtype=torch.float64)
    off = lambda a: int(((a - third).abs() > 1e-12 * third.abs()).sum())
    return f"\nagainst Python's libm: fastnn off at {off(out)} points, torch's reference off at {off(ref)}"


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_cpp_functor_float64(act):
    z = activation_grid(torch.float64)
    out, dout = native_eval(act, z)
    ref = stable_reference(act)(z)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-300, msg=lambda m: m + _libm_opinion(act, z, out, ref))
    torch.testing.assert_close(dout, act.grad(z), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_cpp_functor_float32(act):
    """float32 functors against the float64 reference, point by point, by numerics'
    float32_math_problems (2x PyTorch's float32 error plus 8 ulp)."""
    z = activation_grid(torch.float32)
    problems = float32_math_problems(act, z, *native_eval(act, z))
    assert not problems, problems


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_cpp_functor_for_16bit_results(act, dtype):
    """The float math the 16-bit kernels use before they round to 16 bits (gelu: shorter
    polynomials, activations.h Accuracy::kHalf): within 2.5e-5 of the float64 reference (relative;
    for derivatives of max(|reference|, 1)), and rounded to the 16-bit type, within 0.53 of its ulp
    (numerics' rounded_16bit_problems; float16's half ulp is 2.4e-4 relative or more)."""
    z = activation_grid(torch.float32)
    out, dout = native_eval(act, z, _native.DTYPE_CODES[dtype])
    for name, got, ref, floor in (("value", out, stable_reference(act)(z.double()), 0.0),
                                  ("derivative", dout, act.grad(z.double()), 1.0)):
        finite = torch.isfinite(ref)
        err = (got.double() - ref).abs()
        # (+1e-35: below exp(-87) the host exp flushes to 0, as PyTorch's vectorised float math)
        assert (err[finite] <= 2.5e-5 * ref[finite].abs().clamp(min=floor) + 1e-35).all(), \
            f"{act.name} {name}: {float((err / ref.abs().clamp(min=max(floor, 1e-30)))[finite].max()):.3g} relative"
    problems = rounded_16bit_problems(act, dtype, z, out, dout)
    assert not problems, problems


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_16bit_kernels_use_their_functors(name, dtype):
    """The 16-bit passes compute, bit for bit, what the test hook gives for their dtype rounded
    once: the functors checked above are the ones the kernels run."""
    C = _native.cpu_module()
    act, code = activations.get(name), _native.DTYPE_CODES[dtype]
    z = (torch.randn(67, 515, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    y, dz, db = torch.empty_like(z), torch.empty_like(z), torch.empty(515)
    C.cpu_bias_act_forward(code, act.code, 67, 515, z.data_ptr(), 0, y.data_ptr(), 0, 1)
    ones = torch.ones_like(z)
    C.cpu_act_backward(code, act.code, 67, 515, ones.data_ptr(), z.data_ptr(), 0, dz.data_ptr(), db.data_ptr(), 1)
    out, dout = native_eval(act, z.float(), code)
    assert torch.equal(y, out.to(dtype))
    assert torch.equal(dz, dout.to(dtype))


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_cpp_functor_special_values(act):
    z = torch.tensor(SPECIAL, dtype=torch.float32)
    assert_special_values(act, z, *native_eval(act, z))


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_pack_mask_bits_through_kernel(name):
    """The sign mask: bit c % 8 of byte c / 8 is whether dY passes unscaled, z > 0 (relu: NaN too,
    as torch's threshold_backward; leaky_relu_backward scales dY at NaN), across tile edges and
    ragged tails."""
    C = _native.cpu_module()
    act = activations.get(name)
    for rows, cols in [(1, 1), (3, 7), (5, 9), (70, 513), (2, 1030)]:
        z = torch.randn(rows, cols)
        z.view(-1)[::7] = 0.0
        z.view(-1)[3::11] = float("nan")
        y = torch.empty_like(z)
        mask = torch.zeros(rows, (cols + 7) // 8, dtype=torch.uint8)
        C.cpu_bias_act_forward(0, act.code, rows, cols, z.data_ptr(), 0, y.data_ptr(), mask.data_ptr(), 1)
        bits = (mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
        passes = ~(z <= 0) if name == "relu" else z > 0
        assert torch.equal(passes, act.grad(z) == 1)
        assert torch.equal(bits.reshape(rows, -1)[:, :cols].bool(), passes)
        assert torch.equal(bits.reshape(rows, -1)[:, cols:], torch.zeros_like(bits.reshape(rows, -1)[:, cols:]))


def test_saved_bytes_documented():
    assert activations.saved_bytes_per_element("identity", torch.bfloat16) == 0
    assert activations.saved_bytes_per_element("relu", torch.bfloat16) == 1 / 8
    assert activations.saved_bytes_per_element("gelu", torch.bfloat16) == 2
    assert activations.saved_bytes_per_element("gelu", torch.float32) == 4


def test_gated_names_map_to_gate_activations():
    assert {k: v for k, v in fastnn.GATED.items()} == {
        "swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}
    assert math.isclose(activations.LEAKY_SLOPE, 0.01)


def test_gelu_tail_flushes_before_subnormals():
    """Every float32 with 12.5 <= |z| <= 13.5: the gelu functor's value and derivative are 0 or
    normal, never subnormal (a subnormal anywhere in the vector loop costs a microcode assist per
    instruction on Intel cores: about 2x on the whole pass), and away from the flush (|z| < 12.89)
    the value is still the stable reference's, to the z^2 / 2 ulp that rounding z^2 costs there
    (see math::gauss_tail)."""
    act = activations.get("gelu")
    lo, hi = (torch.tensor([v], dtype=torch.float32).view(torch.int32).item() for v in (12.5, 13.5))
    mag = torch.arange(lo, hi + 1, dtype=torch.int32).view(torch.float32)
    z = torch.cat([mag, -mag])
    out, dout = native_eval(act, z)
    tiny = torch.finfo(torch.float32).tiny
    for got in (out, dout):
        assert not ((got != 0) & (got.abs() < tiny)).any()
    kept = z.abs() < 12.89
    ref = stable_reference(act)(z.double())[kept]
    ulps = (out.double()[kept] - ref).abs() / (torch.finfo(torch.float32).eps * ref.abs())
    assert (ulps <= 8 + z.double()[kept] ** 2 / 2).all(), ulps.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", [a for a in ACTS if a.torch_backward is not None], ids=lambda a: a.name)
def test_composite_backward_is_eager_autograd(act, dtype):
    """The PyTorch-ops composite (the torch backend, the block's rebuild where a backend has none)
    forms dZ with PyTorch's own backward kernel of a one-op activation: bit for bit eager autograd's,
    NaN and inf included, in one pass; its forward is the op itself."""
    from fastnn.autograd import act_composite, act_dz
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(64, 33, generator=gen) * 4).to(dtype)
    z[0, :5] = torch.tensor(SPECIAL).to(dtype)
    dy = torch.randn(64, 33, generator=gen).to(dtype)
    dy[1] = float("inf")
    dy[2, ::3] = float("nan")
    leaf = z.clone().requires_grad_()
    y = act.fn(leaf)
    (ref,) = torch.autograd.grad(y, leaf, dy)
    assert torch.equal(act_composite(z, act).isnan(), y.isnan())
    assert torch.equal(torch.nan_to_num(act_composite(z, act)), torch.nan_to_num(y.detach()))
    got = act_dz(dy, z, act)
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gated", list(fastnn.GATED), ids=str)
def test_gated_composite_is_eager_autograd(gated, dtype):
    """The gated unit's composite with a one-op gate: act(z_gate) * z_up and its two gradients as
    eager PyTorch computes them, bit for bit, NaN and inf included."""
    from fastnn.autograd import glu_composite, glu_dz
    act = activations.get_gated(gated)
    assert act.torch_backward is not None
    gen = torch.Generator().manual_seed(0)
    zg, zu, dy = ((torch.randn(40, 33, generator=gen) * 3).to(dtype) for _ in range(3))
    zg[0, :5] = torch.tensor(SPECIAL).to(dtype)
    dy[1] = float("inf")
    g, u = zg.clone().requires_grad_(), zu.clone().requires_grad_()
    y = act.fn(g) * u
    ref = torch.autograd.grad(y, (g, u), dy)
    for got, want in zip((glu_composite(zg, zu, act), *glu_dz(dy, zg, zu, act)), (y.detach(), *ref)):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
