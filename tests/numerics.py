"""The numerics rule of ../shared/design.md, for tests: against a float64 reference, fastnn's
error must be at most 2x the error of PyTorch's own ops in the same dtype, plus two units of the
dtype's epsilon times the reference's largest magnitude (so that a PyTorch result that happens to
be exact does not demand an exact fastnn result). For a bias gradient, a sum of dZ over rows, that
magnitude is the largest column sum of |dZ|, which its rounding errors scale with: cancellation can
make the sum itself far smaller (with one output column it is a single number, whose error from
PyTorch is a lucky or unlucky draw: every activation failed the rule on 4% of seeds at 65x127x1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastnn import activations


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return (a.detach().double() - ref.detach().double()).abs().max().item()


def assert_within_2x(what: str, ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor,
                     magnitude: float = 0.0) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != {theirs.dtype}"
    if ref.numel() == 0:
        return
    eps = torch.finfo(theirs.dtype).eps
    ref = ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(ours.double()), finite), f"{what}: non-finite values differ"
    ours, theirs, ref = ours.double()[finite], theirs.double()[finite], ref[finite]
    e_ours, e_theirs = max_err(ours, ref), max_err(theirs, ref)
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, magnitude)
    atol = 2 * eps * max(scale, 1e-30)
    assert e_ours <= 2 * e_theirs + atol, (
        f"{what}: fastnn error {e_ours:.3g} > 2 x PyTorch's {e_theirs:.3g} + {atol:.3g} (scale {scale:.3g})"
    )


def make_inputs(shape_x, n_out, dtype, device, bias=True, requires_grad=True, glu=False):
    """x ~ N(0,1); weights ~ N(0, 1/in_features) so that pre-activations are O(1) in every dtype."""
    k = shape_x[-1]
    scale = 1.0 / max(k, 1) ** 0.5

    def w():
        return (torch.randn(n_out, k, device=device) * scale).to(dtype).requires_grad_(requires_grad)

    def b():
        return (torch.randn(n_out, device=device) * 0.5).to(dtype).requires_grad_(requires_grad) if bias else None

    x = torch.randn(*shape_x, device=device).to(dtype).requires_grad_(requires_grad)
    if glu:
        return x, w(), w(), b(), b()
    return x, w(), b()


def torch_linear_act(x, w, b, name):
    return activations.get(name).fn(F.linear(x, w, b))


def torch_linear_glu(x, wg, wu, bg, bu, name):
    return activations.get_gated(name).fn(F.linear(x, wg, bg)) * F.linear(x, wu, bu)


def grads(y, inputs, g):
    """Gradients of y against the inputs that require grad (None elsewhere) for upstream g."""
    live = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, live, g, allow_unused=True))
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


def bias_grad_magnitude(torch_fn, ref_inputs, i, y_r, g):
    """The largest column sum of |dZ| if input i is a bias added to every row of y_r (run again
    with the bias given per row, whose gradient is then dZ itself), else 0."""
    b = ref_inputs[i]
    if b is None or not b.requires_grad or b.dim() != 1 or y_r.dim() < 2 or b.shape[0] != y_r.shape[-1]:
        return 0.0
    per_row = b.detach().expand(*y_r.shape[:-1], b.shape[0]).clone().requires_grad_()
    again = list(ref_inputs)
    again[i] = per_row
    try:
        y = torch_fn(*again)
    except (ValueError, RuntimeError):  # a function that insists on a 1-D bias (fastnn's own ops)
        return 0.0
    if y.shape != y_r.shape or not torch.allclose(y, y_r, rtol=1e-12, atol=1e-12):
        return 0.0
    (dz,) = torch.autograd.grad(y, per_row, g)
    return dz.abs().reshape(-1, b.shape[0]).sum(0).max().item()


def check_against_reference(fn, torch_fn, inputs, what="", g_seed=1):
    """Runs fn and torch_fn on `inputs` and torch_fn on their float64 copies; checks the output
    and every gradient with the 2x rule."""
    y = fn(*inputs)
    y_t = torch_fn(*inputs)
    ref_inputs = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    y_r = torch_fn(*ref_inputs)
    assert_within_2x(f"{what} forward", y, y_t, y_r)
    if not any(t is not None and t.requires_grad for t in inputs):
        return
    gen = torch.Generator(device="cpu").manual_seed(g_seed)
    g = torch.randn(y_r.shape, generator=gen, dtype=torch.float64).to(y.device)
    g_lo = g.to(y.dtype)
    ours = grads(y, inputs, g_lo)
    theirs = grads(y_t, inputs, g_lo)
    ref = grads(y_r, ref_inputs, g_lo.double())
    for i, (a, b_, r) in enumerate(zip(ours, theirs, ref)):
        if r is None:
            assert a is None or inputs[i] is None
            continue
        assert a is not None, f"{what}: gradient {i} missing"
        assert_within_2x(f"{what} grad[{i}]", a, b_, r,
                         bias_grad_magnitude(torch_fn, ref_inputs, i, y_r, g_lo.double()))


# NaN, +-inf and +-0: where each activation and its derivative are checked against the reference exactly
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0]


def assert_special_values(act, z, out, dout):
    """act and act' at NaN, +-inf and +-0 as the reference gives them: NaN where it has NaN (a NaN
    z gives NaN, but for relu' and leaky_relu', which the sign mask defines), else its values."""
    for what, got, ref in (("value", out, act.fn(z.double())), ("derivative", dout, act.grad(z.double()))):
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{act.name} {what}: {got.tolist()} vs {ref.tolist()}"
        finite = ~torch.isnan(ref)
        torch.testing.assert_close(got[finite].double(), ref[finite], msg=f"{act.name} {what}")
    assert torch.isnan(out[0]), act.name
