"""A bias changed in place between forward and backward (an optimizer step on it, a hook, a write
through .data). F.linear keeps no bias for backward, so eager PyTorch allows the change and its
gradients are those of the forward's bias; fastnn's fused calls give the same gradients, bit for
bit those of a run without the change (fastnn/autograd.py, keep_bias). The composite backward
(create_graph=True), which recomputes the pre-activation from the bias, raises instead."""
import copy

import pytest
import torch
import torch.nn as nn

import fastnn

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [("linear_act", "gelu", "none"), ("linear_act", "relu", "none"), ("linear_act", "silu", "none"),
         ("linear_act", "identity", "none"), ("linear_glu", "swiglu", "none"), ("linear_glu", "reglu", "none"),
         ("mlp", "gelu", "none"), ("mlp", "gelu", "activation"), ("mlp", "relu", "none"),
         ("mlp", "swiglu", "none"), ("mlp", "swiglu", "activation"), ("mlp", "gelu", "fc1"), ("mlp", "swiglu", "fc1")]
IDS = ["-".join(c) for c in CASES]


def _call(op, activation, level, dtype, backend="cpu"):
    """(parameters, biases, forward) of one fused call on the cpu backend."""
    gen = torch.Generator().manual_seed(0)
    m, k, n = 37, 24, 40

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_()

    gated = activation in fastnn.GATED
    x, w1, b1 = t(m, k), t(n, k, scale=k ** -0.5), t(n)
    wu, bu = (t(n, k, scale=k ** -0.5), t(n)) if gated else (None, None)
    w2, b2 = t(k, n, scale=n ** -0.5), t(k)
    if op == "mlp":
        params = [x, w1, b1, w2, b2] + ([wu, bu] if gated else [])
        return params, [b for b in (b1, bu, b2) if b is not None], lambda: fastnn.mlp(
            x, w1, b1, w2, b2, activation, up_weight=wu, up_bias=bu, recompute=level, backend=backend)
    if gated:
        return [x, w1, wu, b1, bu], [b1, bu], lambda: fastnn.linear_glu(x, w1, wu, b1, bu, activation, backend=backend)
    return [x, w1, b1], [b1], lambda: fastnn.linear_act(x, w1, b1, activation, backend=backend)


def _grads(op, activation, level, dtype, change=None, backend="cpu"):
    params, biases, fwd = _call(op, activation, level, dtype, backend)
    y = fwd()
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    if change == "in place":
        with torch.no_grad():
            for b in biases:
                b.add_(1.0)
    elif change == ".data":
        for b in biases:
            b.data.mul_(-3.0)
    return torch.autograd.grad(y, params, dy)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,activation,level", CASES, ids=IDS)
@pytest.mark.parametrize("change", ["in place", ".data"])
def test_gradients_are_the_forward_bias_ones(op, activation, level, dtype, change):
    unchanged = _grads(op, activation, level, dtype)
    changed = _grads(op, activation, level, dtype, change)
    composite = _grads(op, activation, level, dtype, backend="torch")
    for a, b, c in zip(unchanged, changed, composite):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        # (and right: a backward that lost the bias would pass the comparison above)
        assert (a.double() - c.double()).abs().max() <= 0.02 * c.double().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,activation,level", [CASES[0], CASES[4], CASES[6], CASES[10]],
                         ids=[IDS[0], IDS[4], IDS[6], IDS[10]])
def test_composite_backward_refuses_a_changed_bias(op, activation, level, dtype):
    params, biases, fwd = _call(op, activation, level, dtype)
    y = fwd()
    torch.autograd.grad(y.sum(), params, create_graph=True, retain_graph=True)  # unchanged: fine
    with torch.no_grad():
        biases[0].add_(1.0)
    with pytest.raises(RuntimeError, match="bias was modified by an inplace operation.*composite"):
        torch.autograd.grad(y.sum(), params, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_only_training_step_between_forward_and_backward(dtype):
    """BitFit-style: the weights frozen, an SGD step on the biases between a forward and its
    backward: the fused model's gradients are the unfused one's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48), nn.SiLU(), nn.Linear(48, 8)).to(dtype)
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)
    fused = fastnn.fuse(copy.deepcopy(model))
    x = torch.randn(16, 48, dtype=dtype)
    grads = []
    for m in (model, fused):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        first = m(x).float().pow(2).mean()
        second = m(x * 2).float().pow(2).mean()
        first.backward()
        opt.step()  # changes the biases second's graph was built with
        opt.zero_grad()
        second.backward()
        grads.append([p.grad.float() for p in m.parameters() if p.requires_grad])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["linear_act", "linear_glu", "mlp"])
def test_bias_made_in_inference_mode(op, dtype):
    """Biases created under torch.inference_mode (no version counter): F.linear keeps none, so
    eager PyTorch gives x's gradient; so does fastnn, the same as with ordinary biases."""
    gen = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    x, w, wu, w2 = t(37, 24), t(40, 24) / 5, t(40, 24) / 5, t(24, 40) / 6
    with torch.inference_mode():
        inference_biases = (t(40), t(40), t(24))
    assert all(b.is_inference() for b in inference_biases)
    calls = {"linear_act": lambda x, b, bu, b2: fastnn.linear_act(x, w, b, "gelu", backend="cpu"),
             "linear_glu": lambda x, b, bu, b2: fastnn.linear_glu(x, w, wu, b, bu, "swiglu", backend="cpu"),
             "mlp": lambda x, b, bu, b2: fastnn.mlp(x, w, b, w2, b2, "gelu", backend="cpu")}
    grads = []
    for biases in (inference_biases, tuple(b.clone() for b in inference_biases)):
        x_ = x.clone().requires_grad_()
        y = calls[op](x_, *biases)
        grads.append(torch.autograd.grad(y, x_, torch.ones_like(y))[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("op,activation,dtype", [("linear_act", "gelu", torch.float32),
                                                 ("linear_act", "gelu", torch.bfloat16),
                                                 ("linear_act", "relu", torch.bfloat16),
                                                 ("linear_glu", "swiglu", torch.float32),
                                                 ("linear_glu", "swiglu", torch.bfloat16)],
                         ids=lambda v: v if isinstance(v, str) else str(v)[6:])
def test_under_torch_compile(op, activation, dtype):
    """Under torch.compile (fastnn's torch.library ops) a bias changed in place between forward and
    backward gives the forward's gradients too, as compiled F.linear does: the op keeps no bias
    where backward does not read it, and where it does (the cpu backend's 16-bit pre-activation
    lacks it) an opaque copy (fastnn::kept_copy), which the compiler's partitioner cannot replace by
    the bias itself as it would a clone."""
    torch._dynamo.reset()
    unchanged = _grads(op, activation, "none", dtype)
    params, biases, _ = _call(op, activation, "none", dtype)
    if op == "linear_act":
        y = torch.compile(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cpu"))(*params)
    else:
        y = torch.compile(
            lambda x, w, wu, b, bu: fastnn.linear_glu(x, w, wu, b, bu, activation, backend="cpu"))(*params)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        for b in biases:
            b.add_(1.0)
    for a, b in zip(unchanged, torch.autograd.grad(y, params, dy)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
