"""Tier 1: the cpu backend's two orientations of linear_act's forward GEMM (fastnn/backends/cpu.py):
Z = x W^T, or Z^T = W x^T with the pass after it reading Z^T and writing y (and Z or its sign mask)
row-major. Both run on every machine through PRODUCT_OVERRIDE (FASTNN_CPU_PRODUCT) and each must
meet the numerics rule; awkward shapes cross the pass's blocks (16 x 256 in float32, 32 x 128 in 16
bits) and its threading threshold."""
import pytest
import torch

import fastnn
from fastnn.backends import BACKENDS
from fastnn.backends import cpu as cpu_backend
from numerics import check_against_reference, make_inputs, torch_linear_act, torch_linear_glu

ORIENTATIONS = ["direct", "transposed"]
# (rows, in, out): one block; rows and columns off the block sizes; past the threading threshold;
# rows a multiple of 128 bytes (Z^T's rows padded, fastnn/backends/cpu.py: _transposed_out)
SHAPES = [(5, 7, 9), (17, 33, 261), (100, 64, 700), (33, 20, 520), (64, 20, 300)]


@pytest.fixture
def orientation(request, monkeypatch):
    monkeypatch.setattr(cpu_backend, "PRODUCT_OVERRIDE", request.param)
    return request.param


@pytest.mark.parametrize("orientation", ORIENTATIONS, indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "relu", "leaky_relu", "silu", "identity"])
def test_linear_act_both_orientations(orientation, shape, dtype, activation):
    m, k, n = shape
    x, w, b = make_inputs((m, k), n, dtype, "cpu")
    check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cpu"),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b],
                            what=f"{orientation} {activation} {dtype} {shape}")


@pytest.mark.parametrize("orientation", ORIENTATIONS, indirect=True)
@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_saved_tensors_match_the_direct_orientation(orientation, activation, bias):
    """What forward keeps for backward is laid out alike either way: Z row-major (the bias included
    where the GEMM adds it, cpu.f32_bias_in_pass) or the sign mask of Z, bit for bit the same as the
    direct orientation's for the mask, and y and Z within a float32 GEMM's reordering."""
    act = fastnn.activations.get(activation)
    torch.manual_seed(0)
    x, w = torch.randn(37, 29), torch.randn(300, 29)
    b = torch.randn(300) if bias else None
    y, kept = BACKENDS["cpu"].linear_act_fwd(x, w, b, act, True)
    z = torch.addmm(b, x, w.t()) if bias else x @ w.t()
    torch.testing.assert_close(y, act.fn(z), rtol=1e-6, atol=1e-6)
    if act.saves == "preact":
        product = x @ w.t() if BACKENDS["cpu"].backward_reads_bias(x.dtype, act) else z
        torch.testing.assert_close(kept, product, rtol=1e-6, atol=1e-6)
    elif act.saves == "mask":
        flags = (z > 0).to(torch.uint8)
        flags = torch.nn.functional.pad(flags, (0, (-flags.shape[1]) % 8)).view(37, -1, 8)
        expect = (flags << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
        assert kept.dtype == torch.uint8 and torch.equal(kept, expect)
    else:
        assert kept.numel() == 0


@pytest.mark.parametrize("orientation", ["transposed"], indirect=True)
@pytest.mark.parametrize("rows", [45, 64, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transposed_pass_is_the_transpose(orientation, rows, dtype):
    """identity without bias: y is the GEMM's Z^T transposed, bit for bit, whether Z^T's rows are
    padded (rows a multiple of 128 bytes) or not."""
    x, w = torch.randn(rows, 31).to(dtype), torch.randn(270, 31).to(dtype)
    product, _ = cpu_backend._gemm_transposed(x, w, None, False)
    padded = rows * x.element_size() % 128 == 0 and not cpu_backend.gemm_in_float32(dtype)
    assert product.stride() == ((rows + 64 // x.element_size()) if padded else rows, 1)
    y = fastnn.linear_act(x, w, None, "identity", backend="cpu")
    assert torch.equal(y, torch.mm(w, x.t()).t())


def test_transposed_pass_rejects_a_short_leading_dimension():
    C = fastnn._native.cpu_module()
    zt, y = torch.zeros(8, 4), torch.empty(4, 8)
    with pytest.raises(ValueError, match="leading dimension"):
        C.cpu_act_forward_from_transposed(0, 0, 4, 8, zt.data_ptr(), 3, 0, y.data_ptr(), 0, 0, 1)


@pytest.mark.parametrize("orientation", ORIENTATIONS, indirect=True)
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
@pytest.mark.parametrize("level", ["none", "activation"])
def test_mlp_both_orientations(orientation, activation, level):
    gated = activation in fastnn.GATED
    torch.manual_seed(0)
    m, k, hidden = 19, 24, 70
    x = torch.randn(m, k, dtype=torch.float64).float().requires_grad_()
    w1, b1 = (torch.randn(hidden, k) / 5).requires_grad_(), torch.randn(hidden).requires_grad_()
    wu = (torch.randn(hidden, k) / 5).requires_grad_() if gated else None
    bu = torch.randn(hidden).requires_grad_() if gated else None
    w2, b2 = (torch.randn(k, hidden) / 8).requires_grad_(), torch.randn(k).requires_grad_()
    params = [p for p in (x, w1, b1, wu, bu, w2, b2) if p is not None]

    def ref(*ps):
        x_, w1_, b1_, *rest = ps
        if gated:
            wu_, bu_, w2_, b2_ = rest
            h = fastnn.activations.get_gated(activation).fn(x_ @ w1_.t() + b1_) * (x_ @ wu_.t() + bu_)
        else:
            w2_, b2_ = rest
            h = fastnn.activations.get(activation).fn(x_ @ w1_.t() + b1_)
        return h @ w2_.t() + b2_

    check_against_reference(
        lambda *ps: fastnn.mlp(ps[0], ps[1], ps[2], ps[-2], ps[-1], activation, up_weight=ps[3] if gated else None,
                               up_bias=ps[4] if gated else None, recompute=level, backend="cpu"),
        ref, params, what=f"{orientation} mlp {activation} {level}")


def test_orientation_choice(monkeypatch):
    monkeypatch.setattr(cpu_backend, "PRODUCT_OVERRIDE", None)
    limit = cpu_backend.TRANSPOSED_PRODUCT_MAX_ROWS
    for intel in (True, False):  # float32 GEMMs on CPUs other than Intel's
        monkeypatch.setattr(cpu_backend, "_intel_cpu", lambda intel=intel: intel)
        assert cpu_backend.product_transposed(limit, torch.float32, fold_bias=True) is not intel
        assert cpu_backend.product_transposed(2, torch.float32, fold_bias=True) is not intel
        assert not cpu_backend.product_transposed(limit + 1, torch.float32, fold_bias=True)
        assert not cpu_backend.product_transposed(1, torch.float32, fold_bias=True)  # (one row: the same GEMV)
        for dtype in (torch.bfloat16, torch.float16):  # 16-bit inputs multiplied in float32 too
            expect = cpu_backend.gemm_in_float32(dtype) and not intel
            assert cpu_backend.product_transposed(16, dtype, fold_bias=True) == expect
            assert not cpu_backend.product_transposed(1, dtype, fold_bias=True)
    monkeypatch.setattr(cpu_backend, "GEMM16_OVERRIDE", "native")
    for amx in (True, False):
        monkeypatch.setattr(cpu_backend, "_has_amx", lambda amx=amx: amx)
        for dtype in (torch.bfloat16, torch.float16):
            assert cpu_backend.product_transposed(limit, dtype, fold_bias=False) is amx
            assert not cpu_backend.product_transposed(limit, dtype, fold_bias=True)
            assert not cpu_backend.product_transposed(limit + 1, dtype, fold_bias=False)
        # a column-major weight (transformers' Conv1D read transposed) keeps the direct orientation;
        # a row-major one, a one-row one and a row-major view of a wider matrix do not decide it
        column_major = torch.empty(768, 3072, dtype=torch.bfloat16).t()
        assert not cpu_backend.product_transposed(16, torch.bfloat16, False, (column_major,))
        assert not cpu_backend.product_transposed(16, torch.bfloat16, False, (column_major.t().t(), column_major))
        for weight in (column_major.contiguous(), torch.empty(3072, 1024, dtype=torch.bfloat16)[:, :768]):
            assert cpu_backend.product_transposed(16, torch.bfloat16, False, (weight,))
        # without AMX, bfloat16 at whole 16-row blocks up to 64 rows, for weights of 2^19 elements or
        # more, but not with in_features a power of two from 1024 (_bf16_transposed_without_amx);
        # float16 only with AMX
        for rows, shape in ((16, (3072, 768)), (32, (768, 3072)), (48, (4096, 11008)), (64, (2560, 640)),
                             (16, (6144, 1536)), (64, (3072, 512)), (16, (256, 3072)), (32, (768, 683))):
            weight = torch.empty(shape, dtype=torch.bfloat16)
            assert cpu_backend.product_transposed(rows, torch.bfloat16, False, (weight,))
            assert cpu_backend.product_transposed(rows, torch.float16, False, (weight.half(),)) is amx
            assert not cpu_backend.product_transposed(rows, torch.bfloat16, True, (weight,))
        for rows, shape in ((16, (3072, 1024)), (32, (3072, 2048)), (64, (768, 4096)), (8, (3072, 768)),
                            (24, (3072, 768)), (80, (3072, 768)), (128, (3072, 768)), (16, (512, 768)),
                            (64, (32, 768)), (16, (1, 768)), (48, (640, 640))):
            weight = torch.empty(shape, dtype=torch.bfloat16)
            assert cpu_backend.product_transposed(rows, torch.bfloat16, False, (weight,)) is amx
        assert cpu_backend.product_transposed(16, torch.bfloat16, False) is amx  # (no weights: not known)
    monkeypatch.setattr(cpu_backend, "PRODUCT_OVERRIDE", "transposed")
    assert cpu_backend.product_transposed(10**6, torch.float16, fold_bias=False)
    assert cpu_backend.product_transposed(16, torch.bfloat16, False, (torch.empty(8, 4).t(),))


@pytest.mark.parametrize("orientation", ORIENTATIONS, indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "reglu"])
def test_linear_glu_both_orientations(orientation, shape, dtype, activation):
    m, k, n = shape
    x, wg, wu, bg, bu = make_inputs((m, k), n, dtype, "cpu", glu=True)
    check_against_reference(
        lambda x, wg, wu, bg, bu: fastnn.linear_glu(x, wg, wu, bg, bu, activation, backend="cpu"),
        lambda x, wg, wu, bg, bu: torch_linear_glu(x, wg, wu, bg, bu, activation), [x, wg, wu, bg, bu],
        what=f"{orientation} {activation} {dtype} {shape}")


@pytest.mark.parametrize("orientation", ["transposed"], indirect=True)
def test_glu_saved_products_are_row_major(orientation):
    torch.manual_seed(0)
    x, wg, wu, bg, bu = torch.randn(21, 13), torch.randn(270, 13), torch.randn(270, 13), torch.randn(270), None
    gate = fastnn.activations.get_gated("swiglu")
    y, z_gate, z_up = BACKENDS["cpu"].linear_glu_fwd(x, wg, wu, bg, bu, gate, True)
    bias_in_gemm = not BACKENDS["cpu"].backward_reads_bias(x.dtype, gate)  # (cpu.f32_bias_in_pass)
    torch.testing.assert_close(z_gate + (0 if bias_in_gemm else bg), torch.addmm(bg, x, wg.t()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z_up, x @ wu.t(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, torch.nn.functional.silu(torch.addmm(bg, x, wg.t())) * z_up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("orientation", ORIENTATIONS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "silu", "swiglu"])
def test_pass_over_the_product_is_the_rebuild(orientation, dtype, activation):
    """Either orientation's forward pass gives y bit for bit as the row-major pass over the product
    it keeps (act_hidden / glu_hidden: what the MLP block rebuilds h with), the bias added in the
    pass where the GEMM left it out (16-bit GEMMs)."""
    torch.manual_seed(0)
    be = BACKENDS["cpu"]
    x, w, wu = torch.randn(45, 31).to(dtype), torch.randn(270, 31).to(dtype), torch.randn(270, 31).to(dtype)
    b, bu = torch.randn(270).to(dtype), torch.randn(270).to(dtype)
    if activation in fastnn.GATED:
        act = fastnn.activations.get_gated(activation)
        y, z_gate, z_up = be.linear_glu_fwd(x, w, wu, b, bu, act, True)
        assert torch.equal(y, be.glu_hidden(z_gate, z_up, b, bu, act))
    else:
        act = fastnn.activations.get(activation)
        y, kept = be.linear_act_fwd(x, w, b, act, True)
        assert torch.equal(y, be.act_hidden(kept, b, act))
