"""Gradients with inf and NaN in them (a float16 overflow upstream, a NaN pre-activation) come out
as eager PyTorch's, position by position. relu's and squared_relu's backward ends in torch's
threshold_backward, which gives exactly 0 where z <= 0 whatever dY is (a product dY * 0 would give
NaN for an inf dY, and turn a GradScaler step PyTorch takes into a skipped one) and passes dY where
z is NaN; leaky_relu scales dY there; the others multiply.

The inputs make each pre-activation column one value: x = 1 (K = 1) and W = 0, so z[:, j] = b[j],
with b holding negatives, 0, NaN, positives and saturating magnitudes; dY holds inf, -inf and NaN
in some rows and small integers elsewhere."""
import pytest
import torch
import torch.nn.functional as F

import fastnn
from cases import HAS_CUDA
from fastnn import activations
from fastnn.backends import triton as triton_backend

TRITON = triton_backend.IMPORT_ERROR is None
# (backend, device, dtypes): the Triton interpreter in float32 and float16 only (its bf16 is unreliable)
BACKENDS = [("cpu", "cpu", (torch.float32, torch.bfloat16, torch.float16)),
            ("torch", "cpu", (torch.float32, torch.bfloat16))]
if TRITON and not HAS_CUDA:
    BACKENDS.append(("triton", "cpu", (torch.float32, torch.float16)))
GPU_BACKENDS = [(name, "cuda", (torch.float32, torch.bfloat16, torch.float16)) for name in ("cuda", "triton")]
CASES = [pytest.param(b, dev, dt, id=f"{b}-{str(dt)[6:]}") for b, dev, dts in BACKENDS for dt in dts]
CASES += [pytest.param(b, dev, dt, id=f"{b}-gpu-{str(dt)[6:]}", marks=pytest.mark.gpu)
          for b, dev, dts in GPU_BACKENDS for dt in dts]

# (the last six saturate sigmoid, tanh and the GELUs: act' rounds to 0, to 1 or to a tiny value there, so an
# inf dY gives NaN, inf or a signed inf position by position, as eager's)
BIAS = [-1.0, 0.0, float("nan"), 2.0, -3.0, 0.5, -0.0, 1.0, 30.0, -30.0, 100.0, -100.0, 1e4, -1e4]
ROWS = 7


def _dy(n, dtype, device):
    dy = (torch.arange(ROWS * n, dtype=torch.float32).reshape(ROWS, n) % 5 - 2)
    dy[0] = float("inf")
    dy[1, : n // 2] = float("nan")
    dy[2, n // 2:] = -float("inf")
    return dy.to(dtype=dtype, device=device)


def _leaves(device, dtype, *specs):
    """Leaf tensors from (shape, fill value) or (shape, list of values)."""
    out = []
    for shape, fill in specs:
        t = torch.tensor(fill) if isinstance(fill, list) else torch.full(shape, fill)
        out.append(t.to(dtype=dtype, device=device).requires_grad_())
    return out


def _assert_same(what, got, ref, dtype):
    for i, (a, r) in enumerate(zip(got, ref)):
        a, r = a.double().cpu(), r.double().cpu()
        assert torch.equal(torch.isnan(a), torch.isnan(r)), f"{what} grad[{i}] NaN at {a.tolist()} vs {r.tolist()}"
        assert torch.equal(torch.isinf(a), torch.isinf(r)), f"{what} grad[{i}] inf at {a.tolist()} vs {r.tolist()}"
        finite = torch.isfinite(r)
        assert torch.equal(a[torch.isinf(a)], r[torch.isinf(r)]), f"{what} grad[{i}]: signs of inf"
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a[finite], r[finite], rtol=tol, atol=tol, msg=f"{what} grad[{i}]")


EAGER = {"relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, activations.LEAKY_SLOPE),
         "squared_relu": lambda z: torch.square(F.relu(z)), "gelu": F.gelu, "silu": F.silu,
         "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "sigmoid": torch.sigmoid, "tanh": torch.tanh,
         "quick_gelu": lambda z: z * torch.sigmoid(activations.QUICK_GELU_SCALE * z)}


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("activation", list(EAGER))
def test_linear_act(backend, device, dtype, activation):
    n = len(BIAS)
    x, w, b = _leaves(device, dtype, ((ROWS, 1), 1.0), ((n, 1), 0.0), ((n,), BIAS))
    dy = _dy(n, dtype, device)
    got = torch.autograd.grad(fastnn.linear_act(x, w, b, activation, backend=backend), (x, w, b), dy)
    ref = torch.autograd.grad(EAGER[activation](F.linear(x, w, b)), (x, w, b), dy)
    _assert_same(f"{backend} {activation} {dtype}", got, ref, dtype)


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("activation", ["reglu", "swiglu"])
def test_linear_glu(backend, device, dtype, activation):
    n = len(BIAS)
    # z_up: no 0 where z_gate > 0 (Triton's reglu gives dZ_gate 0 there, where PyTorch's is dY * 0:
    # see triton_kernels/linear_glu.py, backward)
    up = [2.0, -1.0, 1.0, 0.5, 3.0, -2.0, 1.0, 0.5, 1.0, -1.0, 2.0, 0.5, -3.0, 1.0]
    x, wg, wu, bg, bu = _leaves(device, dtype, ((ROWS, 1), 1.0), ((n, 1), 0.0), ((n, 1), 0.0), ((n,), BIAS),
                                ((n,), up))
    dy = _dy(n, dtype, device)
    leaves = (x, wg, wu, bg, bu)
    got = torch.autograd.grad(fastnn.linear_glu(x, wg, wu, bg, bu, activation, backend=backend), leaves, dy)
    gate = EAGER[activations.GATED[activation]]
    ref = torch.autograd.grad(gate(F.linear(x, wg, bg)) * F.linear(x, wu, bu), leaves, dy)
    _assert_same(f"{backend} {activation} {dtype}", got, ref, dtype)


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("activation", ["relu", "squared_relu", "gelu", "reglu"])
@pytest.mark.parametrize("level", ["none", "activation"])
def test_mlp(backend, device, dtype, activation, level):
    """The block: fc2's dgrad dH = dY @ W2 carries dY's inf and NaN into fc1's act' (for relu on
    Triton and cuBLASLt as fc2's dgrad epilogue)."""
    n, out = len(BIAS), 2
    gated = activation in fastnn.GATED
    x, w1, b1, w2, b2, wu, bu = _leaves(device, dtype, ((ROWS, 1), 1.0), ((n, 1), 0.0), ((n,), BIAS),
                                        ((out, n), 1.0), ((out,), 0.0), ((n, 1), 0.0), ((n,), 1.0))
    if not gated:
        wu = bu = None
    leaves = [t for t in (x, w1, b1, w2, b2, wu, bu) if t is not None]
    dy = _dy(out, dtype, device)
    y = fastnn.mlp(x, w1, b1, w2, b2, activation, up_weight=wu, up_bias=bu, recompute=level, backend=backend)
    got = torch.autograd.grad(y, leaves, dy)
    if gated:
        h = EAGER[activations.GATED[activation]](F.linear(x, w1, b1)) * F.linear(x, wu, bu)
    else:
        h = EAGER[activation](F.linear(x, w1, b1))
    ref = torch.autograd.grad(F.linear(h, w2, b2), leaves, dy)
    _assert_same(f"{backend} mlp {activation} {level} {dtype}", got, ref, dtype)
