"""Tier 1 (and tier 4 on a GPU): fastnn.linear_act against PyTorch's composite and a float64
reference, with the 2x error rule, on the native backends (cpu; cuda where present). Triton has
its own module (test_triton.py) since its interpreter runs only some dtypes and small shapes."""
import pytest
import torch

import fastnn
from fastnn.backends import cpu as cpu_backend
from cases import DTYPES, SHAPES, native_backend_params
from numerics import check_against_reference, make_inputs, torch_linear_act

ACTS = list(fastnn.ACTIVATIONS)
BACKEND_PARAMS = native_backend_params()


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_matrix(backend, device, shape, dtype, activation):
    m, k, n = shape
    x, w, b = make_inputs((m, k), n, dtype, device)
    check_against_reference(
        lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend=backend),
        lambda x, w, b: torch_linear_act(x, w, b, activation),
        [x, w, b], what=f"{backend} {activation} {dtype} {shape}")


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 1, 4)], ids=lambda s: f"{len(s) + 1}d")
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_leading_dims(backend, device, lead, activation):
    x, w, b = make_inputs((*lead, 19), 23, torch.float32, device)
    y = fastnn.linear_act(x, w, b, activation, backend=backend)
    assert y.shape == (*lead, 23)
    check_against_reference(
        lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend=backend),
        lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b], what=f"lead {lead}")


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "leaky_relu", "identity"])
def test_non_contiguous(backend, device, dtype, activation):
    # x: a transposed and strided view; weight: stored transposed; bias: a strided slice
    base = torch.randn(40, 3, 33, device=device).to(dtype)
    x = base[::2, 1, :].detach().requires_grad_()  # (20, 33), row stride 198
    xt = torch.randn(33, 20, device=device).to(dtype).t().detach().requires_grad_()  # (20, 33)
    w = (torch.randn(33, 29, device=device) / 33**0.5).to(dtype).t().detach().requires_grad_()
    b = torch.randn(58, device=device).to(dtype)[::2].detach().requires_grad_()
    assert not x.is_contiguous() and not xt.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    for xx in (x, xt):
        check_against_reference(
            lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend=backend),
            lambda x, w, b: torch_linear_act(x, w, b, activation), [xx, w, b], what="non-contiguous")


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("activation", ACTS)
def test_no_bias(backend, device, activation):
    x, w, _ = make_inputs((31, 45), 37, torch.float32, device, bias=False)
    check_against_reference(
        lambda x, w: fastnn.linear_act(x, w, None, activation, backend=backend),
        lambda x, w: torch_linear_act(x, w, None, activation), [x, w], what="no bias")


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
def test_zero_rows(backend, device, activation):
    x, w, b = make_inputs((0, 16), 8, torch.float32, device)
    y = fastnn.linear_act(x, w, b, activation, backend=backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))
    x3, w3, b3 = make_inputs((2, 0, 16), 8, torch.float32, device)
    assert fastnn.linear_act(x3, w3, b3, activation, backend=backend).shape == (2, 0, 8)


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
def test_zero_in_features(backend, device):
    x, w, b = make_inputs((4, 0), 6, torch.float32, device)
    y = fastnn.linear_act(x, w, b, "gelu", backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.gelu(b.detach()).expand(4, 6))


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("which", ["x", "weight", "bias", "x+bias"])
def test_partial_gradients(backend, device, which):
    """Backward computes only the gradients asked for, and those match."""
    x, w, b = make_inputs((9, 13), 11, torch.float32, device, requires_grad=False)
    for name, t in (("x", x), ("weight", w), ("bias", b)):
        t.requires_grad_(name in which)
    check_against_reference(
        lambda x, w, b: fastnn.linear_act(x, w, b, "gelu", backend=backend),
        lambda x, w, b: torch_linear_act(x, w, b, "gelu"), [x, w, b], what=which)


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
def test_no_grad_saves_nothing(backend, device):
    """Under no_grad the op is asked not to save the pre-activation."""
    x, w, b = make_inputs((8, 8), 8, torch.float32, device)
    with torch.no_grad():
        y = fastnn.linear_act(x, w, b, "gelu", backend=backend)
    assert not y.requires_grad
    x2 = x.detach().reshape(-1, 8)
    _, saved = torch.ops.fastnn.linear_act_fwd(x2, w.detach(), b.detach(), "gelu", backend, False)
    assert saved.numel() == 0
    _, saved = torch.ops.fastnn.linear_act_fwd(x2, w.detach(), b.detach(), "gelu", backend, True)
    assert saved.shape == (8, 8)
    _, mask = torch.ops.fastnn.linear_act_fwd(x2, w.detach(), b.detach(), "relu", backend, True)
    shape, dtype = fastnn.backends.BACKENDS[backend].saved_spec(fastnn.activations.get("relu"), 8, 8, torch.float32)
    assert mask.dtype == torch.uint8 == dtype and tuple(mask.shape) == shape
    assert mask.numel() * 8 < 8 * 8 * 32  # bits, not floats


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_PARAMS if p.values[0] == "cpu"])
@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck_float64(backend, device, activation):
    """float64 through the native CPU kernels (the CUDA backend serves float32 and narrower)."""
    x, w, b = make_inputs((6, 5), 4, torch.float64, device)
    # keep pre-activations away from relu's kink at 0, where the derivative is not defined
    with torch.no_grad():
        z = torch.nn.functional.linear(x, w, b)
        b += torch.where(z.abs().min(0).values < 1e-3, 0.1, 0.0)
    assert torch.autograd.gradcheck(
        lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend=backend), (x, w, b))


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
def test_special_values(backend, device):
    """inf and NaN flow as they do in PyTorch: never silently replaced."""
    w = torch.eye(4, device=device)
    x = torch.tensor([[0.0, float("nan"), float("inf"), -float("inf")]], device=device)
    for activation in ACTS:
        ours = fastnn.linear_act(x, w, None, activation, backend=backend)
        ref = torch_linear_act(x.double(), w.double(), None, activation).float()
        # x @ eye(4) mixes inf and nan into every column (inf * 0 = nan), as PyTorch does
        assert torch.equal(torch.isnan(ours), torch.isnan(torch_linear_act(x, w, None, activation))), activation
    x = torch.tensor([[1.0, -2.0, float("nan"), 3.0]], device=device)
    w = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0], device=device))
    for activation in ACTS:
        with torch.no_grad():
            z = x.clone()  # x @ I without the nan spreading: per-column check through the epilogue
        ours = fastnn.linear_act(z[:, :2], w[:2, :2], None, activation, backend=backend)
        assert torch.isfinite(ours).all(), activation


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
def test_deterministic(backend, device):
    x, w, b = make_inputs((300, 70), 90, torch.float32, device)
    outs = []
    for _ in range(2):
        y = fastnn.linear_act(x, w, b, "gelu", backend=backend)
        gx, gw, gb = torch.autograd.grad(y.square().sum(), (x, w, b))
        outs.append((y, gx, gw, gb))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


def test_auto_matches_torch_backend():
    x, w, b = make_inputs((7, 9), 5, torch.float32, "cpu")
    for activation in ACTS:
        check_against_reference(
            lambda x, w, b: fastnn.linear_act(x, w, b, activation),
            lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="torch"),
            [x, w, b], what=f"auto {activation}")


@pytest.mark.parametrize("cols", [4096, 4001], ids=["aligned-rows", "odd-cols"])
@pytest.mark.parametrize("activation", ["gelu", "silu", "relu", "identity"])
def test_cpu_outputs_past_the_streaming_size(cols, activation):
    """Outputs of 16 MiB and more are written with non-temporal stores (csrc/cpu/convert.h): whole
    aligned vectors streamed, the rest stored as usual (the GELUs store all as usual); forward and
    backward against PyTorch."""
    x, w, b = make_inputs((1100, 8), cols, torch.float32, "cpu")
    assert 1100 * cols * 4 >= 16 << 20
    check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cpu"),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b],
                            what=f"streamed {activation} {cols}")


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("gemm16", ["native", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_output_does_not_depend_on_grad_mode(backend, device, gemm16, dtype, monkeypatch):
    """The same bits with and without a gradient to give, as eager PyTorch: a no_grad forward
    (evaluation, or reentrant checkpointing's first pass) and its recomputation with grad agree."""
    monkeypatch.setattr(cpu_backend, "GEMM16_OVERRIDE", gemm16)
    x, w, b = make_inputs((37, 24), 40, dtype, device)
    wu, bu = w.detach().flip(0).requires_grad_(), b.detach().flip(0).requires_grad_()
    calls = [(a, lambda a=a: fastnn.linear_act(x, w, b, a, backend=backend)) for a in ACTS]
    calls += [(a, lambda a=a: fastnn.linear_glu(x, w, wu, b, bu, a, backend=backend)) for a in fastnn.GATED]
    for name, call in calls:
        with torch.no_grad():
            plain = call()
        assert torch.equal(call().detach(), plain), name
