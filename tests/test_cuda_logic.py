"""Tier 1 for the CUDA backend's Python side (fastnn/backends/cuda.py), the parts that decide what
runs without running it: the judge of cuBLASLt's activation epilogues (its probe on a GPU is
tests/test_cuda.py), the judge of the CUDA kernels' own activation math (test_cuda.py's
test_kernel_math_point_by_point), the bias gradient of an input with no features, and the TF32
policy read through both of torch's APIs."""
import math
import warnings

import numerics
import pytest
import torch

from fastnn import activations
from fastnn.backends import cuda as cuda_backend
from fastnn.backends.base import tf32_allowed


def _exact_z(dtype):
    """What the probe computes: multiples of 1/16 (zeros included) and a NaN row."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (64, 16), generator=gen).double() / 4
    w = torch.randint(-2, 3, (128, 16), generator=gen).double() / 4
    x[5, 0] = float("nan")
    return x @ w.t()


def _mask_bytes(bits):
    """cuBLASLt's sign-mask layout: bit c % 8 of byte c // 8, rows padded to 128 bits."""
    m, n = bits.shape
    padded = torch.zeros(m, cuda_backend.relu_aux_ld(n), dtype=torch.uint8)
    padded[:, :n] = bits.to(torch.uint8)
    return (padded.reshape(m, -1, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1).to(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_relu_epilogue_judge(dtype):
    relu = activations.get("relu")
    z = _exact_z(dtype)
    assert (z == 0).any() and torch.isnan(z).any()
    y = torch.relu(z).to(dtype)
    mask = _mask_bytes(~(z <= 0))  # relu'(NaN) = 1: torch's threshold_backward passes dY there
    assert cuda_backend.epilogue_agrees(relu, dtype, z, y, None)
    assert cuda_backend.epilogue_agrees(relu, dtype, z, y, mask)
    assert not cuda_backend.epilogue_agrees(relu, dtype, z, torch.nan_to_num(y, nan=0.0), None)  # fmax(NaN, 0)
    assert not cuda_backend.epilogue_agrees(relu, dtype, z, y, _mask_bytes(z >= 0))  # relu'(0) = 1
    assert not cuda_backend.epilogue_agrees(relu, dtype, z, y, _mask_bytes(z > 0))  # relu'(NaN) = 0
    off = y.clone()
    off[0, 0] += 1
    assert not cuda_backend.epilogue_agrees(relu, dtype, z, off, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gelu_tanh_epilogue_judge(dtype):
    gelu = activations.get("gelu_tanh")
    z = _exact_z(dtype)
    exact = torch.nn.functional.gelu(z, approximate="tanh")
    kept = torch.zeros(64, cuda_backend.gelu_aux_ld(128), dtype=dtype)
    kept[:, :128] = z.to(dtype)
    assert cuda_backend.epilogue_agrees(gelu, dtype, z, exact.to(dtype), kept)
    # a cruder tanh (or the erf form): outside the rule in float32, where PyTorch is near exact
    # (in bfloat16 both are within the rule: its rounding is far coarser than their differences)
    crude = (exact + 1e-4 * torch.sign(z)).to(dtype)
    assert cuda_backend.epilogue_agrees(gelu, dtype, z, crude, None) == (dtype == torch.bfloat16)
    erf_form = torch.nn.functional.gelu(z).to(dtype)
    assert cuda_backend.epilogue_agrees(gelu, dtype, z, erf_form, None) == (dtype == torch.bfloat16)
    assert not cuda_backend.epilogue_agrees(gelu, dtype, z, (exact * 1.05).to(dtype), None)
    wrong_kept = kept.clone()
    wrong_kept[1, 1] += 1
    assert not cuda_backend.epilogue_agrees(gelu, dtype, z, exact.to(dtype), wrong_kept)


def test_weight_grad_of_an_input_with_no_features_needs_no_gemm():
    """dW of an input with no features is empty: _wgrad asks cuBLASLt for nothing (the bias
    gradient, dY.sum(0), is the column sum's, whatever K is)."""
    class NoGpu:
        def gemm(self, *args, **kwargs):
            raise AssertionError("no GEMM is needed for K = 0")

    dz, x = torch.randn(8, 16), torch.randn(8, 0)
    assert cuda_backend.CudaBackend._wgrad(NoGpu(), dz, x).shape == (16, 0)


def test_tf32_policy_through_both_apis():
    """fp32_precision (torch >= 2.9) and the legacy flag both decide; reading never warns or raises."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only allow_tf32")
    before = (matmul.fp32_precision, torch.backends.fp32_precision)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            matmul.fp32_precision = "tf32"
            assert tf32_allowed()
            matmul.fp32_precision = "ieee"
            assert not tf32_allowed()
            torch.backends.fp32_precision = "tf32"
            matmul.fp32_precision = "none"  # inherit the global setting
            assert tf32_allowed()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matmul.allow_tf32 = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not tf32_allowed()
    finally:
        matmul.fp32_precision, torch.backends.fp32_precision = before[0], before[1]


def test_auto_leaves_triton_out_for_exact_float32():
    """auto on CUDA tensors: Triton serves 16-bit and TF32 float32, not exact float32 (CUDA cores)."""
    from fastnn.backends import auto_order
    gelu = activations.get("gelu")
    matmul = torch.backends.cuda.matmul
    assert auto_order("cuda", gelu, torch.bfloat16) == ["cuda", "triton", "torch"]
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert auto_order("cuda", gelu, torch.float32) == ["cuda", "torch"]
        matmul.fp32_precision = "tf32"
        assert auto_order("cuda", gelu, torch.float32) == ["cuda", "triton", "torch"]
    finally:
        matmul.fp32_precision = before


def _exact_dh_z():
    """What the dgrad probe computes: dH exact (multiples of 1/16), z multiples of 1/16 with zeros."""
    gen = torch.Generator().manual_seed(0)
    dh = (torch.randint(-2, 3, (64, 16), generator=gen).double() / 4) @ (
        torch.randint(-2, 3, (16, 128), generator=gen).double() / 4)
    z = torch.randint(-40, 41, (64, 128), generator=gen).double() / 16
    return dh, z


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_relu_dgrad_epilogue_judge(dtype):
    """DRELU_BGRAD is used in the MLP block only if its dZ is dH * relu'(z) exactly, relu'(0) = 0."""
    relu = activations.get("relu")
    dh, z = _exact_dh_z()
    assert (z == 0).any() and (dh[:, None] != 0).any()
    assert cuda_backend.dgrad_epilogue_agrees(relu, dtype, dh, z, (dh * (z > 0)).to(dtype))
    zero_passes = (dh * (z >= 0)).to(dtype)
    assert not torch.equal(zero_passes, (dh * (z > 0)).to(dtype))
    assert not cuda_backend.dgrad_epilogue_agrees(relu, dtype, dh, z, zero_passes)
    # a row of dH that an inf in dY made NaN: dZ is 0 there where z <= 0 (torch's threshold_backward)
    dh[9] = float("nan")
    select = torch.where(z > 0, dh, 0.0)
    assert cuda_backend.dgrad_epilogue_agrees(relu, dtype, dh, z, select.to(dtype))
    assert not cuda_backend.dgrad_epilogue_agrees(relu, dtype, dh, z, (dh * (z > 0)).to(dtype))  # NaN * 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gelu_tanh_dgrad_epilogue_judge(dtype):
    """DGELU_BGRAD: within the numerics rule against PyTorch's gelu backward in the same dtype,
    NaN where z is NaN."""
    gelu = activations.get("gelu_tanh")
    dh, z = _exact_dh_z()
    z[3, 7] = float("nan")
    exact = dh * gelu.grad(z)
    assert cuda_backend.dgrad_epilogue_agrees(gelu, dtype, dh, z, exact.to(dtype))
    assert not cuda_backend.dgrad_epilogue_agrees(gelu, dtype, dh, z, torch.nan_to_num(exact).to(dtype))
    # the erf form's derivative instead of the tanh form's: outside the rule in float32 only
    erf = dh * activations.get("gelu").grad(z)
    assert cuda_backend.dgrad_epilogue_agrees(gelu, dtype, dh, z, erf.to(dtype)) == (dtype == torch.bfloat16)


class _FakeGeluEpilogue:
    """Stands in for cuBLASLt: GELU_BIAS on CPU tensors, off by `abs_error` everywhere."""

    def __init__(self, abs_error):
        self.abs_error = abs_error

    def gemm(self, m, n, k, a, lda, trans_a, b, ldb, trans_b, d, ldd, epilogue=None, bias=None, aux=None, aux_ld=0,
             **_):
        z = a.double() @ b.double().t() + bias.double()
        d.copy_(torch.nn.functional.gelu(z, approximate="tanh") + self.abs_error)
        return True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gelu_probe_sees_an_error_that_does_not_scale_with_the_output(dtype):
    """An epilogue off by 3e-4 everywhere (the size of what a bias added in bfloat16 gave on
    gelu_tanh outputs near 0.004 on an H200) passes at the probe's first scale (outputs up to about
    5) and fails at the second."""
    gelu = activations.get("gelu_tanh")
    assert cuda_backend._probe(_FakeGeluEpilogue(0.0), gelu, cuda_backend.GELU_BIAS, dtype, "cpu")
    assert not cuda_backend._probe(_FakeGeluEpilogue(3e-4), gelu, cuda_backend.GELU_BIAS, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_math_judge(dtype):
    """tests/test_cuda.py's test_kernel_math_point_by_point judges the CUDA kernels' gelu by
    numerics' rules on every value it feeds them: the CPU kernels' gelu (the functors
    test_activations checks) passes; PyTorch's erf form fails in 16 bits, in its negative tail (255
    bfloat16 ulp off at z = -8.6, 1.3 float16 ulp at z = -4.1), and so does a float32 gelu 16 ulp off."""
    from fastnn import _native
    from test_cuda import every_value

    C, act, code = _native.cpu_module(), activations.get("gelu"), _native.DTYPE_CODES[dtype]
    z = every_value(dtype)
    z = z[torch.isfinite(z)]
    y, dz, db = torch.empty_like(z), torch.empty_like(z), torch.empty(z.numel())
    C.cpu_bias_act_forward(code, act.code, 1, z.numel(), z.data_ptr(), 0, y.data_ptr(), 0, 1)
    ones = torch.ones_like(z)
    C.cpu_act_backward(code, act.code, 1, z.numel(), ones.data_ptr(), z.data_ptr(), 0, dz.data_ptr(), db.data_ptr(), 1)
    if dtype == torch.float32:
        assert not numerics.float32_math_problems(act, z, y, dz)
        assert numerics.float32_math_problems(act, z, y * (1 + 16 * torch.finfo(torch.float32).eps), dz)
    else:
        assert not numerics.rounded_16bit_problems(act, dtype, z.float(), y, dz)
        erf_form = 0.5 * z.float() * (1 + torch.erf(z.float() / math.sqrt(2)))
        assert numerics.rounded_16bit_problems(act, dtype, z.float(), erf_form.to(dtype), None)
