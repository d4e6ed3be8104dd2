"""The numerics rule of ../shared/design.md, for tests: against a float64 reference, fastnn's
error must be at most 2x the error of PyTorch's own ops in the same dtype, plus two units of the
dtype's epsilon times the reference's largest magnitude (so that a PyTorch result that happens to
be exact does not demand an exact fastnn result). For a bias gradient, a sum of dZ over rows, that
magnitude is the largest column sum of |dZ|, which its rounding errors scale with: cancellation can
make the sum itself far smaller (with one output column it is a single number, whose error from
PyTorch is a lucky or unlucky draw: every activation failed the rule on 4% of seeds at 65x127x1)."""
from __future__ import annotations

import math

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


def assert_special_values(act, z, out, dout, dtype=None):
    """act and act' at NaN, +-inf and +-0 as the reference gives them: NaN where it has NaN (a NaN
    z gives NaN, but for relu' and leaky_relu', which the sign mask defines), else its values
    (rounded to `dtype` where given: leaky_relu's slope 0.01 is 0.010009765625 in bfloat16)."""
    for what, got, ref in (("value", out, act.fn(z.double())), ("derivative", dout, act.grad(z.double()))):
        if dtype is not None:
            ref = ref.to(dtype).double()
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{act.name} {what}: {got.tolist()} vs {ref.tolist()}"
        finite = ~torch.isnan(ref)
        torch.testing.assert_close(got[finite].double(), ref[finite], msg=f"{act.name} {what}")
    assert torch.isnan(out[0]), act.name


# ---- the activations' math, point by point (the C++ functors on the CPU, the CUDA kernels) -------
def activation_grid(dtype):
    """z in [-12, 12] (48001 points) and a few far and tiny values."""
    z = torch.linspace(-12, 12, 48001, dtype=torch.float64)
    extra = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6, 0.5, -0.5, 30.0, -30.0, 80.0, -80.0], dtype=torch.float64)
    return torch.cat([z, extra]).to(dtype)


# PyTorch's float64 gelu forms round 1 + erf(x) and 1 + tanh(u) to 0 in the far negative tail
# (gelu(-12) comes out as -0.0 instead of -2.1e-32); these equal forms keep full relative accuracy
# there, and are what the functors are checked against.
_K0, _K1 = math.sqrt(2 / math.pi), 0.044715
STABLE = {
    "gelu": lambda z: 0.5 * z * torch.erfc(-z / math.sqrt(2)),
    "gelu_tanh": lambda z: z * torch.sigmoid(2 * _K0 * (z + _K1 * z**3)),
}


def stable_reference(act):
    return STABLE.get(act.name, act.fn)


def float32_math_problems(act, z, value, derivative):
    """Where float32 act(z) and act'(z) miss the float64 reference by more than 2x the error of
    PyTorch's own float32 evaluation of the same formula plus 8 ulp (of the value, or of 1 for
    derivatives, whose O(1) terms cancel near their zeros, as PyTorch's do), plus 1e-37 (below -87
    the host exp flushes to 0, as PyTorch's vectorised float32 math does): a message per miss (none:
    right). derivative None: not checked. Finite references only."""
    eps = torch.finfo(torch.float32).eps
    problems = []
    for name, got, fn, floor in (("value", value, act.fn, 0.0), ("derivative", derivative, act.grad, 1.0)):
        if got is None:
            continue
        ref = (stable_reference(act) if name == "value" else fn)(z.double())
        theirs = fn(z.float()).double()
        finite = torch.isfinite(ref)
        err = (got.double() - ref).abs()
        err_theirs = torch.where(finite, (theirs - ref).abs(), 0.0)
        tol = 2 * err_theirs + 8 * eps * torch.clamp(ref.abs(), min=floor) + 1e-37
        bad = finite & ~(err <= tol)
        if bad.any():
            i = torch.nonzero(bad)[0].item()
            problems.append(f"{act.name} {name}: {int(bad.sum())} points off, first at z={z[i].item()}: "
                            f"{got[i].item()} vs {ref[i].item()} (PyTorch float32 {theirs[i].item()})")
    return problems


def rounded_16bit_problems(act, dtype, z, value, derivative):
    """Where act(z) and act'(z), rounded to the 16-bit `dtype`, are more than 0.53 of its ulp from the
    float64 reference (0.5 is correct rounding; of max(|reference|, 1) for derivatives), where the
    reference is a normal number of the type: a message per miss (none: right). derivative None:
    not checked."""
    bits = 8 if dtype == torch.bfloat16 else 11
    problems = []
    for name, got, ref, floor in (("value", value, stable_reference(act)(z.double()), 0.0),
                                  ("derivative", derivative, None if derivative is None else act.grad(z.double()), 1.0)):
        if got is None:
            continue
        finite = torch.isfinite(ref)
        normal = finite & (ref.abs() >= max(torch.finfo(dtype).tiny, 1e-30)) & (ref.abs() <= torch.finfo(dtype).max / 2)
        ulp = torch.ldexp(torch.ones_like(ref), (torch.frexp(ref.abs().clamp(min=floor))[1] - bits).double())
        ulps = (got.to(dtype).double() - ref).abs() / ulp
        if not (ulps[normal] <= 0.53).all():
            worst = torch.argmax(torch.where(normal, ulps, 0.0)).item()
            problems.append(f"{act.name} {name}: {float(ulps[worst]):.3f} ulp of {dtype} at z={z[worst].item()}")
    return problems
