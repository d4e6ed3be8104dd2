"""Tier 1: the cpu backend's weight-gradient GEMM dW = dZ^T X, from the transposed view dZ.t() or from
a row-major copy of dZ^T made by the native transpose (fastnn/backends/cpu.py: wgrad_from_copy). Both
run on every machine through WGRAD_OVERRIDE (FASTNN_CPU_WGRAD) and each must meet the numerics rule;
the transpose itself must be a bit-exact copy on awkward shapes (its 8 x 8 blocks and 64 x 64 tiles,
strided rows, the threading threshold)."""
import pytest
import torch

import fastnn
from fastnn import _native
from fastnn.backends import cpu as cpu_backend
from numerics import check_against_reference, make_inputs, torch_linear_act, torch_linear_glu

pytestmark = pytest.mark.skipif(_native._C is None, reason="the native module is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def native_transpose(src, ld_dst=None):
    rows, cols = src.shape
    ld_dst = rows if ld_dst is None else ld_dst
    out = torch.full((cols, ld_dst), -7.0, dtype=src.dtype)  # the padding must stay untouched
    _native.cpu_module().cpu_transpose(_native.DTYPE_CODES[src.dtype], rows, cols, src.data_ptr(), src.stride(0),
                                       out.data_ptr(), ld_dst, _native.num_threads())
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (8, 8), (65, 127), (1000, 9), (64, 64), (129, 1001), (300, 700)],
                         ids=lambda s: "x".join(map(str, s)))
def test_transpose_is_an_exact_copy(dtype, shape):
    src = torch.randn(*shape).to(dtype)
    src[0, -1] = float("nan")  # bits, not values: a NaN and -0.0 come through as they are
    src[-1, 0] = -0.0
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[src.element_size()]
    assert torch.equal(native_transpose(src).view(bits), src.t().contiguous().view(bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transpose_strided_rows(dtype):
    big = torch.randn(70, 200).to(dtype)
    src = big[:, 5:150]  # rows 200 elements apart
    out = native_transpose(src, ld_dst=77)  # and dst's rows 77 apart
    assert torch.equal(out[:, :70], src.t())
    assert bool((out[:, 70:] == -7.0).all())


def test_transpose_rejects_short_leading_dimensions():
    C = _native.cpu_module()
    src, dst = torch.zeros(4, 6), torch.zeros(6, 4)
    with pytest.raises(ValueError, match="leading dimensions"):
        C.cpu_transpose(0, 4, 6, src.data_ptr(), 5, dst.data_ptr(), 4, 1)
    with pytest.raises(ValueError, match="leading dimensions"):
        C.cpu_transpose(0, 4, 6, src.data_ptr(), 6, dst.data_ptr(), 3, 1)
    C.cpu_transpose(0, 0, 6, 0, 6, 0, 0, 1)  # nothing to copy: no pointer is read


@pytest.fixture
def wgrad(request, monkeypatch):
    monkeypatch.setattr(cpu_backend, "WGRAD_OVERRIDE", request.param)
    return request.param


# rows: the copy route runs where dZ^T's rows fill whole 64-byte lines (32 rows of 16 bits, 16 of
# float32), else the view (5 and 100 rows)
SHAPES = [(5, 7, 9), (64, 33, 261), (100, 64, 700), (96, 130, 65)]


@pytest.mark.parametrize("wgrad", ["view", "copy"], indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
def test_linear_act_wgrad_from_transpose_or_view(wgrad, shape, dtype, activation):
    m, k, n = shape
    x, w, b = make_inputs((m, k), n, dtype, "cpu")
    check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cpu"),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b],
                            what=f"wgrad {wgrad} {activation} {dtype} {shape}")


@pytest.mark.parametrize("wgrad", ["view", "copy"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_glu_wgrad_from_transpose_or_view(wgrad, dtype):
    x, wg, wu, bg, bu = make_inputs((64, 130), 65, dtype, "cpu", glu=True)
    check_against_reference(
        lambda x, wg, wu, bg, bu: fastnn.linear_glu(x, wg, wu, bg, bu, "swiglu", backend="cpu"),
        lambda x, wg, wu, bg, bu: torch_linear_glu(x, wg, wu, bg, bu, "swiglu"), [x, wg, wu, bg, bu],
        what=f"wgrad {wgrad} swiglu {dtype}")


@pytest.mark.parametrize("wgrad", ["view", "copy"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mlp_wgrad_from_transpose_or_view(wgrad, dtype):
    x, w1, b1 = make_inputs((96, 130), 260, dtype, "cpu")
    _, w2, b2 = make_inputs((96, 260), 130, dtype, "cpu")

    def ref(x, w1, b1, w2, b2):
        return torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)

    check_against_reference(lambda *p: fastnn.mlp(*p, "gelu", backend="cpu"), ref, [x, w1, b1, w2, b2],
                            what=f"wgrad {wgrad} mlp {dtype}")


def test_wgrad_choice(monkeypatch):
    monkeypatch.setattr(cpu_backend, "WGRAD_OVERRIDE", None)
    limit = cpu_backend.WGRAD_COPY_MIN_IN_FEATURES
    for dtype in (torch.float32, torch.float64):
        assert not cpu_backend.wgrad_from_copy(dtype, 4096)
    for gemm16 in ("native", "float32"):
        monkeypatch.setattr(cpu_backend, "GEMM16_OVERRIDE", gemm16)
        for amx in (True, False):
            monkeypatch.setattr(cpu_backend, "_has_amx", lambda amx=amx: amx)
            assert cpu_backend.wgrad_from_copy(torch.bfloat16, limit) == (gemm16 == "native" and amx)
            assert not cpu_backend.wgrad_from_copy(torch.bfloat16, limit - 1)
            assert not cpu_backend.wgrad_from_copy(torch.float16, limit)
    monkeypatch.setattr(cpu_backend, "WGRAD_OVERRIDE", "copy")
    assert cpu_backend.wgrad_from_copy(torch.float64, 1)


def test_copy_route_runs_the_native_transpose(monkeypatch):
    """The copy route really hands the GEMM a row-major dZ^T (a test of the route, not of speed)."""
    monkeypatch.setattr(cpu_backend, "WGRAD_OVERRIDE", "copy")
    seen = []
    real = cpu_backend._mm

    def spy(pairs, bias=None, out=None):
        seen.append(pairs[0][0].is_contiguous())
        return real(pairs, bias, out)

    monkeypatch.setattr(cpu_backend, "_mm", spy)
    x, w, b = make_inputs((64, 30), 50, torch.bfloat16, "cpu")
    fastnn.linear_act(x, w, b, "gelu", backend="cpu").sum().backward()
    # forward GEMM, dX, dW: the last is the weight gradient and its left factor is a row-major copy
    assert seen[-1] is True
    # rows that would not fill whole lines of the copy keep the view
    seen.clear()
    x, w, b = make_inputs((40, 30), 50, torch.bfloat16, "cpu")
    fastnn.linear_act(x, w, b, "gelu", backend="cpu").sum().backward()
    assert seen[-1] is False
    monkeypatch.setattr(cpu_backend, "WGRAD_OVERRIDE", "view")
    seen.clear()
    fastnn.linear_act(x, w, b, "gelu", backend="cpu").sum().backward()
    assert seen[-1] is False
