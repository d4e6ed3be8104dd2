"""Backward writes its gradients into the memory of what forward saved (the cpu backend's `reuse`,
fastnn/autograd.py) only where nothing can read that memory again: never under retain_graph,
create_graph or saved-tensor hooks, and never into a tensor the same call still reads."""
import pytest
import torch

import fastnn
from fastnn import activations
from fastnn.backends import BACKENDS

CPU = BACKENDS["cpu"]


def _run(op, activation, level="none"):
    """(inputs needing grads, forward) for one fused op on the cpu backend, 2-D x."""
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
                                          recompute=level, backend="cpu")
    if gated:
        return [x, w1, wu, b1, bu], lambda: fastnn.linear_glu(x, w1, wu, b1, bu, activation, backend="cpu")
    return [x, w1, b1], lambda: fastnn.linear_act(x, w1, b1, activation, backend="cpu")


CASES = [("linear_act", "gelu", "none"), ("linear_act", "relu", "none"), ("linear_act", "silu", "none"),
         ("linear_glu", "swiglu", "none"), ("mlp", "gelu", "none"), ("mlp", "gelu", "activation"),
         ("mlp", "relu", "none"), ("mlp", "swiglu", "none"), ("mlp", "swiglu", "activation")]
IDS = ["-".join(c) for c in CASES]


@pytest.mark.parametrize("op,activation,level", CASES, ids=IDS)
def test_backward_twice_with_retain_graph(op, activation, level):
    params, fwd = _run(op, activation, level)
    y = fwd()
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, params, dy, retain_graph=True)
    second = torch.autograd.grad(y, params, dy)
    fresh = torch.autograd.grad(fwd(), params, dy)
    for a, b, c in zip(first, second, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("op,activation,level", CASES, ids=IDS)
def test_saved_tensor_hooks_see_their_tensors_unchanged(op, activation, level):
    params, fwd = _run(op, activation, level)
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


def _spy(monkeypatch):
    """Records, per backward call of the cpu backend, the shapes of the tensors it was offered."""
    offered = []
    for name in ("linear_act_bwd", "linear_glu_bwd"):
        method = getattr(CPU, name)

        def run(*args, _method=method, **kwargs):
            offered.append([tuple(t.shape) for t in kwargs.get("reuse", ())])
            return _method(*args, **kwargs)

        monkeypatch.setattr(CPU, name, run)
    return offered


H, MASK = (33, 40), (33, 5)  # the hidden activation's shape; a sign mask's
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


@pytest.mark.parametrize("op,activation,level", CASES, ids=IDS)
def test_saved_memory_is_offered_only_when_freed(op, activation, level, monkeypatch):
    offered = _spy(monkeypatch)
    freed, retained = OFFERED[(op, activation, level)]
    params, fwd = _run(op, activation, level)
    y = fwd()
    torch.autograd.grad(y, params, torch.ones_like(y), retain_graph=True)
    assert offered == retained
    offered.clear()
    torch.autograd.grad(y, params, torch.ones_like(y))
    assert offered == freed


def test_recompute_offers_the_recomputed_tensor(monkeypatch):
    """A forward run with save=False recomputes saved in backward: backward's own, even retained."""
    offered = _spy(monkeypatch)
    x = torch.randn(8, 6, requires_grad=True)
    w = torch.randn(10, 6, requires_grad=True)
    y = fastnn.ops.LinearActFunction.apply(x, w, None, "gelu", "cpu", False)
    y.sum().backward(retain_graph=True)
    assert offered == [[(8, 10)]], offered


@pytest.mark.parametrize("activation", ["identity", "relu", "gelu"])
def test_reused_memory_is_never_read_after_it_is_written(activation):
    """dY and saved both offered, and dX the same shape as dZ (square layer): dZ may overwrite dY or
    saved, dX must go elsewhere than dZ and than dY while dZ = dY."""
    torch.manual_seed(1)
    m, n = 19, 16
    act = activations.get(activation)
    x, w, b = torch.randn(m, n), torch.randn(n, n) / 4, torch.randn(n)
    dy = torch.randn(m, n)
    _, saved = CPU.linear_act_fwd(x, w, b, act, True)
    want = CPU.linear_act_bwd(dy.clone(), x, w, b, saved.clone(), act, True, True, True)
    got = CPU.linear_act_bwd(dy, x, w, b, saved, act, True, True, True, reuse=(dy, saved))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
