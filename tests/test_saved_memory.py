"""Backward writes its gradients into the memory of what forward saved (the cpu and cuda backends'
`reuse`, fastnn/autograd.py) only where nothing can read that memory again: never under retain_graph,
create_graph or saved-tensor hooks, and never into a tensor the same call still reads. The cuda
backend runs here on CPU tensors through tests/cuda_standin.py, which raises where a GEMM or kernel
would write over memory it reads."""
import pytest
import torch

import fastnn
from cases import native_backend_params
from fastnn import activations
from fastnn.backends import BACKENDS

# the native backends on CPU tensors: cpu, and cuda through the stand-in
BACKEND_PARAMS = [pytest.param(p.values[0], marks=p.marks, id=p.id) for p in native_backend_params()
                  if p.values[1] == "cpu"]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    return request.param


def _run(op, activation, level="none", backend="cpu"):
    """(inputs needing grads, forward) for one fused op on `backend`, 2-D x."""
    torch.manual_seed(0)
    m, k, n = 33, 24, 40
    gated = activation in fastnn.GATED
    x = torch.randn(m, k, requires_grad=True)
    w1 = (torch.randn(n, k) / k ** 0.5).requires_grad_()
    b1 = torch.randn(n, requires_grad=True)
    wu = (torch.randn(n, k) / k ** 0.5).requires_grad_() if gated else None
    bu = torch.randn(n, requires_grad=True) if gated else None
    w2 = (torch.randn(k, n) / n ** 0.5).requires_grad_()
    b2 = torch.randn(k, requires_grad=True)
    if op == "mlp":
        params = [x, w1, b1, w2, b2] + ([wu, bu] if gated else [])
        return params, lambda: fastnn.mlp(x, w1, b1, w2, b2, activation, up_weight=wu, up_bias=bu,
                                          recompute=level, backend=backend)
    if gated:
        return [x, w1, wu, b1, bu], lambda: fastnn.linear_glu(x, w1, wu, b1, bu, activation, backend=backend)
    return [x, w1, b1], lambda: fastnn.linear_act(x, w1, b1, activation, backend=backend)


CASES = [("linear_act", "gelu", "none"), ("linear_act", "relu", "none"), ("linear_act", "silu", "none"),
         ("linear_glu", "swiglu", "none"), ("mlp", "gelu", "none"), ("mlp", "gelu", "activation"),
         ("mlp", "relu", "none"), ("mlp", "swiglu", "none"), ("mlp", "swiglu", "activation")]
IDS = ["-".join(c) for c in CASES]


@pytest.mark.parametrize("op,activation,level", CASES, ids=IDS)
def test_backward_twice_with_retain_graph(op, activation, level, backend):
    params, fwd = _run(op, activation, level, backend)
    y = fwd()
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, params, dy, retain_graph=True)
    second = torch.autograd.grad(y, params, dy)
    fresh = torch.autograd.grad(fwd(), params, dy)
    for a, b, c in zip(first, second, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("op,activation,level", CASES, ids=IDS)
def test_saved_tensor_hooks_see_their_tensors_unchanged(op, activation, level, backend):
    params, fwd = _run(op, activation, level, backend)
    kept = []

    def pack(t):
        kept.append((t, t.clone()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fwd()
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, params, dy)
    assert kept
    for t, copy in kept:
        torch.testing.assert_close(t, copy, rtol=0, atol=0)
    for a, b in zip(got, torch.autograd.grad(fwd(), params, dy)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _spy(monkeypatch, backend):
    """Records, per backward call of the backend, the shapes of the tensors it was offered (for
    hidden_grad, only where it serves)."""
    offered = []
    be = BACKENDS[backend]
    for name in ("linear_act_bwd", "linear_glu_bwd", "hidden_grad"):
        method = getattr(be, name)

        def run(*args, _method=method, _name=name, **kwargs):
            out = _method(*args, **kwargs)
            if _name != "hidden_grad" or out is not None:
                offered.append([tuple(t.shape) for t in kwargs.get("reuse", ())])
            return out

        monkeypatch.setattr(be, name, run)
    return offered


H, MASK = (33, 40), "mask"  # the hidden activation's shape; a sign mask's (the backend's: _offered)
# per case: the shapes offered to each backward call of the backend (the block: fc2's wgrad, fc2's
# dgrad, fc1), once autograd frees the saved tensors and under retain_graph
OFFERED = {
    ("linear_act", "gelu", "none"): ([[H]], [[]]),
    ("linear_act", "relu", "none"): ([[MASK]], [[]]),
    ("linear_act", "silu", "none"): ([[H]], [[]]),
    ("linear_glu", "swiglu", "none"): ([[H, H]], [[]]),
    # fc2's dgrad may write dH over h; fc1 dZ over z1 (relu: its mask) or over dH, backward's own
    ("mlp", "gelu", "none"): ([[], [H], [H, H]], [[], [], [H]]),
    ("mlp", "relu", "none"): ([[], [H], [MASK, H]], [[], [], [H]]),
    ("mlp", "swiglu", "none"): ([[], [H], [H, H, H]], [[], [], [H]]),
    # h rebuilt in backward is backward's own either way
    ("mlp", "gelu", "activation"): ([[], [H], [H, H]], [[], [H], [H]]),
    ("mlp", "swiglu", "activation"): ([[], [H], [H, H, H]], [[], [H], [H]]),
}


# the cuda backend's block with relu: fc2's dgrad with fc1's act' as its epilogue (hidden_grad,
# cuBLASLt's DRELU_BGRAD), which may write dZ1 over h; fc1's backward is then its plain GEMMs
OFFERED_CUDA = {("mlp", "relu", "none"): ([[], [H], []], [[], [], []])}


def _offered(case, backend):
    """OFFERED's shapes for `backend`, its sign mask's shape in place of MASK."""
    mask = BACKENDS[backend].saved_spec(activations.get("relu"), *H, torch.float32)[0]
    calls = OFFERED_CUDA.get(case, OFFERED[case]) if backend == "cuda" else OFFERED[case]
    return tuple([[mask if shape == MASK else shape for shape in call] for call in c] for c in calls)


@pytest.mark.parametrize("op,activation,level", CASES, ids=IDS)
def test_saved_memory_is_offered_only_when_freed(op, activation, level, backend, monkeypatch):
    freed, retained = _offered((op, activation, level), backend)
    params, fwd = _run(op, activation, level, backend)
    offered = _spy(monkeypatch, backend)
    y = fwd()
    torch.autograd.grad(y, params, torch.ones_like(y), retain_graph=True)
    assert offered == retained
    offered.clear()
    torch.autograd.grad(y, params, torch.ones_like(y))
    assert offered == freed


def test_recompute_offers_the_recomputed_tensor(backend, monkeypatch):
    """A forward run with save=False recomputes saved in backward: backward's own, even retained."""
    offered = _spy(monkeypatch, backend)
    x = torch.randn(8, 6, requires_grad=True)
    w = torch.randn(10, 6, requires_grad=True)
    y = fastnn.ops.LinearActFunction.apply(x, w, None, "gelu", backend, False)
    y.sum().backward(retain_graph=True)
    assert offered == [[(8, 10)]], offered


@pytest.mark.parametrize("activation", ["identity", "relu", "gelu", "gelu_tanh"])
def test_reused_memory_is_never_read_after_it_is_written(activation, backend):
    """dY and saved both offered, and dX the same shape as dZ (square layer): dZ may overwrite dY or
    saved, dX must go elsewhere than dZ and than dY while dZ = dY. The memory is taken: dZ over dY
    (but for identity, whose dZ is dY), dX over the saved pre-activation where it has dZ's shape."""
    torch.manual_seed(1)
    m, n = 19, 16
    be, act = BACKENDS[backend], activations.get(activation)
    x, w, b = torch.randn(m, n), torch.randn(n, n) / 4, torch.randn(n)
    dy = torch.randn(m, n)
    _, saved = be.linear_act_fwd(x, w, b, act, True)
    want = be.linear_act_bwd(dy.clone(), x, w, b, saved.clone(), act, True, True, True)
    dy_before = dy.clone()
    got = be.linear_act_bwd(dy, x, w, b, saved, act, True, True, True, reuse=(dy, saved))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert torch.equal(dy, dy_before) == (activation == "identity")
    assert (got[0].data_ptr() == saved.data_ptr()) == (act.saves == "preact")


def test_gated_backward_reuses_memory(backend):
    """linear_glu's backward offered dY, z_gate and z_up (square layer): both dZ and dX go there,
    with the gradients of a call offered nothing."""
    torch.manual_seed(2)
    m, n = 21, 16
    be, act = BACKENDS[backend], activations.get_gated("swiglu")
    x, wg, wu, bg, bu = torch.randn(m, n), torch.randn(n, n) / 4, torch.randn(n, n) / 4, torch.randn(n), torch.randn(n)
    dy = torch.randn(m, n)
    _, zg, zu = be.linear_glu_fwd(x, wg, wu, bg, bu, act, True)
    want = be.linear_glu_bwd(dy.clone(), x, wg, wu, bg, bu, zg.clone(), zu.clone(), act, True, True, True, True, True)
    offered = {t.data_ptr() for t in (dy, zg, zu)}
    got = be.linear_glu_bwd(dy, x, wg, wu, bg, bu, zg, zu, act, True, True, True, True, True, reuse=(dy, zg, zu))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert got[0].data_ptr() in offered


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
@pytest.mark.parametrize("cuda_backend", [p for p in BACKEND_PARAMS if p.id == "cuda-standin"])
def test_hidden_grad_writes_over_the_offered_hidden_activation(activation, cuda_backend):
    """The cuda backend's hidden_grad (fc2's dgrad with act' as its cuBLASLt epilogue) writes dZ1 over
    an offered h, never over what its GEMM reads (the stand-in raises there), with the values of a
    call offered nothing."""
    torch.manual_seed(3)
    m, k, n = 20, 24, 40
    be, act = BACKENDS[cuda_backend], activations.get(activation)
    x, w1, b1, w2 = torch.randn(m, k), torch.randn(n, k) / 5, torch.randn(n), torch.randn(k, n) / 6
    h, saved = be.linear_act_fwd(x, w1, b1, act, True)
    dy = torch.randn(m, k)
    want = be.hidden_grad(dy, w2, saved, act)
    got = be.hidden_grad(dy, w2, saved, act, reuse=(saved, h))  # (z1, which it reads, first)
    assert want is not None and got.data_ptr() == h.data_ptr()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
