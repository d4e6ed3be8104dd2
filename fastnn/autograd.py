"""The autograd rules of fastnn's linear ops, shared by every op that computes them: fastnn::linear_*
(fastnn/ops.py, any backend) and the Triton backend's own triton_op ops (fastnn/backends/triton.py).
They call the ops through the functions they are given and import no backend, so both can use them.

Backward keeps only what it uses, recomputes what a forward run without `save` did not keep, and
runs a PyTorch composite where fastnn's kernels cannot serve: a torch.func transform or a backward
vmapped over its grad outputs (the kernels cannot read the tensors), and a backward run with
create_graph=True (its gradients must be differentiable, and the kernels' are not)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import activations
from .dropin import batched, functorch_active


# Handing saved memory to backward's outputs. A backward may write dZ over the pre-activation it
# saved (Backend.linear_act_bwd's `reuse`) when nothing can read that tensor again:
#  - the forward did not return it (the eager autograd.Functions below keep it to themselves; the
#    torch.library ops return it, and their schema promises not to mutate their inputs),
#  - no saved-tensor hooks were active at forward time (a pack hook may keep the tensor: offloading,
#    checkpointing, activation statistics),
#  - autograd frees the graph's saved tensors after this backward (no retain_graph / create_graph);
# or when backward itself recomputed it. PyTorch's own AOTAutograd asks autograd the same question.
def saved_tensor_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def graph_freed_after_backward() -> bool:
    kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return kept is not None and not kept()


def saved_may_be_overwritten(ctx) -> bool:
    """Whether this backward may write over what ctx saved: kept private by its forward (which set
    ctx.private_saved) and freed by autograd once this backward returns."""
    return ctx.private_saved and graph_freed_after_backward()


def differentiable_backward_wanted() -> bool:
    """Whether this backward runs with create_graph=True (second derivatives, gradient penalties,
    Hessian-vector products): autograd then runs it with grad mode on and differentiates its
    gradients again, which the kernels' gradients (raw pointers, no graph) cannot be. (torch.compile
    traces its backward with grad mode on too; it does not support double backward.)"""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


# The bias. F.linear keeps none for backward, so eager PyTorch lets a bias change in place between
# forward and backward (an optimizer step on it, a hook) and its gradients are those of the forward's
# bias. fastnn's fused backwards mostly need no bias either: the pre-activation they keep has it.
# Where one does (the cpu backend's 16-bit pre-activation lacks it, backward adds it again; a forward
# run without `save` recomputes), the autograd.Functions and the torch.library ops (torch.compile,
# DTensor) keep a copy of it taken at forward (a row of out_features elements), so backward sees
# the forward's bias as eager PyTorch's does, not autograd's "modified by an inplace operation"
# error, nor, after a change through .data, a silently different one. The composite backward
# recomputes the pre-activation from the bias itself (its gradients must reach it): it gets the
# bias as a BiasAtForward, which raises if it changed.
class BiasAtForward:
    """A bias as the forward saw it, for the composite backward: the tensor and its version counter."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor):
        # (an inference-mode tensor has no version counter; eager PyTorch takes one as a bias)
        self.tensor, self.version = tensor, None if tensor.is_inference() else tensor._version

    def get(self, op):
        if self.version is not None and self.tensor._version != self.version:
            raise RuntimeError(
                f"fastnn.{op}: a bias was modified by an inplace operation between forward and backward "
                f"(version {self.version}, now {self.tensor._version}); this backward runs PyTorch's "
                "composite (create_graph=True, a torch.func transform or batched grad outputs), which "
                "recomputes the pre-activation from the bias. Change the bias after backward, or run this "
                "layer with backend='torch'")
        return self.tensor


def keep_bias(bias, read_by_backward):
    """What backward keeps of `bias` (see above): (what to save_for_backward: a copy where the fused
    backward reads it, else None; its BiasAtForward for the composite), (None, None) without one."""
    if bias is None:
        return None, None
    if not read_by_backward:
        return None, BiasAtForward(bias)
    # Traced (torch.compile's fake and functional tensors) or a subclass (DTensor): an opaque copy, since
    # the partitioner would recompute a clone from the bias. Told by the tensor's type, not by
    # torch.compiler.is_compiling(), which torch 2.11 reads False while AOTAutograd traces this.
    if type(bias) is torch.Tensor or type(bias) is torch.nn.Parameter:
        return bias.detach().clone(), BiasAtForward(bias)
    return torch.ops.fastnn.kept_copy(bias.detach()), BiasAtForward(bias)


def bias_for_composite(ctx, i, saved_bias, op):
    """The i-th bias for the composite backward: the forward's tensor (checked unchanged) where the
    forward kept a BiasAtForward in ctx.biases_at_forward, else what it saved."""
    kept = ctx.biases_at_forward[i] if ctx.biases_at_forward else None
    return saved_bias if kept is None else kept.get(op)


def linear_act_autograd(fwd_call, bwd_call, *, bias_read, private_saved=False):
    """(setup_context, backward) for a linear_act forward whose inputs are
    (x, weight, bias, activation, *extra, save) and whose outputs are (y, saved), or with
    private_saved, y alone: setup_context(ctx, inputs, (y, saved)) is then called by the forward,
    and backward may overwrite `saved` (see above).

    fwd_call(x, weight, bias, activation, extra, save) -> (y, saved) runs the forward op;
    bwd_call(dy, x, weight, bias, saved, activation, extra, need_dx, need_dw, need_db, reuse)
    -> (dx, dw, db).
    Backward keeps only what it will use: x for dW, the weight (for dX, and for the composite below,
    which recomputes z; a parameter, already alive), the bias (see keep_bias) and the backend's `saved`.
    A forward run with save=False (fastnn's recompute mode, or a raw call of the op) keeps the
    inputs instead and recomputes `saved` in backward.
    bias_read(dtype, act, extra) says whether the backend's backward reads the bias (act an
    Activation, None for a gated unit's up projection): the bias is kept as keep_bias says, for the
    eager Functions and the torch.library ops (torch.compile, DTensor) alike.
    """

    def setup_context(ctx, inputs, output):
        x, weight, bias, activation = inputs[:4]
        save = inputs[-1]
        ctx.activation, ctx.extra = activation, tuple(inputs[4:-1])
        ctx.has_bias = bias is not None
        ctx.recompute = not save and activations.get(activation).saves != "nothing"
        ctx.private_saved = private_saved and not saved_tensor_hooks_active()
        keep_x = ctx.needs_input_grad[1] or ctx.recompute
        if not private_saved:
            ctx.mark_non_differentiable(output[1])
            ctx.set_materialize_grads(False)  # no zero-filled gradient for `saved` (a full y-sized fill)
        bias, at_forward = keep_bias(bias, ctx.recompute or bias_read(x.dtype, activations.get(activation), ctx.extra))
        ctx.biases_at_forward = (at_forward,)
        ctx.save_for_backward(x if keep_x else None, weight, bias, output[1])

    def backward(ctx, dy, _dsaved=None):
        x, weight, bias, saved = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        tail = (None, *([None] * len(ctx.extra)), None)
        if dy is None or not (need_dx or need_dw or need_db):
            return (None, None, None) + tail
        if functorch_active() or batched(dy) or differentiable_backward_wanted():
            bias = bias_for_composite(ctx, 0, bias, "linear_act")
            return _composite_act_backward(dy, x, weight, bias, ctx.activation, need_dx, need_dw, need_db) + tail
        if ctx.recompute:
            with torch.no_grad():
                _, saved = fwd_call(x, weight, bias, ctx.activation, ctx.extra, True)
        reuse = (saved,) if ctx.recompute or saved_may_be_overwritten(ctx) else ()
        # an empty stand-in (the ops' "nothing") for x when it was not kept: backends read it only
        # for dW. Not backends.base's helper: importing the backends package registers the Triton
        # ops, which import this module.
        x = x if x is not None else dy.new_empty((0,))
        dx, dw, db = bwd_call(dy, x, weight, bias, saved, ctx.activation, ctx.extra, need_dx, need_dw, need_db,
                              reuse)
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None) + tail

    return setup_context, backward


# The activation around a kept pre-activation in PyTorch ops, computed in float32 (or float64) and
# rounded once: the composites below, the torch backend's op-level methods and the block op's
# "activation" level where the backend cannot rebuild h itself. An activation that is one PyTorch op
# (act.torch_backward) runs as that op and its backward kernel on the tensors themselves, as eager
# PyTorch runs it, bit for bit: each computes 16-bit inputs in float32 and rounds once, in one pass
# (a gated unit's product then rounds once more, as eager's act(z_gate) * z_up does).
def compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _backward_kernel(act, *tensors):
    """act.torch_backward where it may serve: not in a graph that create_graph builds (PyTorch has
    no derivative of silu_backward), where the float32 composite of act.grad is differentiable."""
    if act.torch_backward is None or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    return act.torch_backward


def act_composite(z, act):
    """act(z), rounded to z's dtype."""
    if act.torch_backward is not None:
        return act.fn(z)
    return act.fn(z.to(compute_dtype(z.dtype))).to(z.dtype)


def glu_composite(z_gate, z_up, gate_act):
    """act(z_gate) * z_up, rounded to their dtype."""
    if gate_act.torch_backward is not None:
        return gate_act.fn(z_gate) * z_up
    ct = compute_dtype(z_gate.dtype)
    return (gate_act.fn(z_gate.to(ct)) * z_up.to(ct)).to(z_gate.dtype)


def act_dz(dy, z, act):
    """dZ = dY * act'(z), rounded to dY's dtype."""
    kernel = _backward_kernel(act, dy, z)
    if kernel is not None:
        return kernel(dy, z.to(dy.dtype))
    ct = compute_dtype(dy.dtype)
    return act.grad_times(dy.to(ct), z.to(ct)).to(dy.dtype)


def glu_dz(dy, z_gate, z_up, gate_act):
    """(dZ_gate, dZ_up) of act(z_gate) * z_up, rounded to dY's dtype."""
    kernel = _backward_kernel(gate_act, dy, z_gate, z_up)
    if kernel is not None:  # eager autograd's own sequence
        return kernel(dy * z_up, z_gate), dy * gate_act.fn(z_gate)
    ct = compute_dtype(dy.dtype)
    g, zg, zu = dy.to(ct), z_gate.to(ct), z_up.to(ct)
    return gate_act.grad_times(g * zu, zg).to(dy.dtype), (g * gate_act.fn(zg)).to(dy.dtype)


def _composite_act_backward(dy, x, weight, bias, activation, need_dx, need_dw, need_db):
    """linear_act's backward in PyTorch ops, z recomputed from the inputs: for a backward whose
    gradients must be differentiable (create_graph=True), or that runs under a torch.func transform
    although its forward did not (autograd.functional.jacobian with vectorize=True, autograd.grad
    with is_grads_batched=True vmap over the grad outputs), where fastnn's kernels cannot read the
    batched tensors."""
    if x is None:
        if batched(dy):
            what = "is vmapped over its grad outputs (jacobian(vectorize=True), is_grads_batched=True)"
            remedy = "use vectorize=False, or backend='torch' for this call"
        else:
            what = "runs with create_graph=True"
            remedy = ("for gradients of gradients run this layer with backend='torch', or unfused "
                      "(fastnn.unfuse(model))")
        raise RuntimeError(
            f"fastnn.linear_act: this backward {what}, so it runs PyTorch's composite, which needs x; this "
            f"forward did not keep x because its weight needs no gradient (as F.linear); {remedy}")
    dz = act_dz(dy, F.linear(x, weight, bias), activations.get(activation))
    return (dz @ weight if need_dx else None, dz.t() @ x if need_dw else None,
            dz.sum(0) if need_db else None)


def register_linear_act_autograd(fwd_op: str, fwd_call, bwd_call, bias_read) -> None:
    setup_context, backward = linear_act_autograd(fwd_call, bwd_call, bias_read=bias_read)
    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


def linear_glu_autograd(fwd_call, bwd_call, *, bias_read, private_saved=False):
    """(setup_context, backward) for a linear_glu forward whose inputs are
    (x, gate_weight, up_weight, gate_bias, up_bias, activation, *extra, save), and whose outputs are
    (y, z_gate, z_up), or with private_saved y alone (as for linear_act_autograd).

    fwd_call(x, gate_weight, up_weight, gate_bias, up_bias, activation, extra, save) runs the op;
    bwd_call(dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, activation, extra,
             needs, reuse) -> 5 grads,
    needs = (dx, d_gate_weight, d_up_weight, d_gate_bias, d_up_bias). With save=False the
    pre-activations are recomputed in backward from the kept inputs. bias_read: as for
    linear_act_autograd (asked for the gate's activation and for the up projection, act None).
    """

    def setup_context(ctx, inputs, output):
        x, gate_weight, up_weight, gate_bias, up_bias, activation = inputs[:6]
        ctx.activation, ctx.extra = activation, tuple(inputs[6:-1])
        ctx.has_bias = (gate_bias is not None, up_bias is not None)
        ctx.recompute = not inputs[-1]
        ctx.private_saved = private_saved and not saved_tensor_hooks_active()
        if not private_saved:
            ctx.mark_non_differentiable(output[1], output[2])
            ctx.set_materialize_grads(False)
        gate_act = activations.get_gated(activation)
        gate_bias, gate_at_forward = keep_bias(gate_bias, ctx.recompute or bias_read(x.dtype, gate_act, ctx.extra))
        up_bias, up_at_forward = keep_bias(up_bias, ctx.recompute or bias_read(x.dtype, None, ctx.extra))
        ctx.biases_at_forward = (gate_at_forward, up_at_forward)
        ctx.save_for_backward(x, gate_weight, up_weight, gate_bias, up_bias, output[1], output[2])

    def backward(ctx, dy, _dzg=None, _dzu=None):
        x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = (n[0], n[1], n[2], ctx.has_bias[0] and n[3], ctx.has_bias[1] and n[4])
        none_tail = (None, *([None] * len(ctx.extra)), None)
        if dy is None or not any(needs):
            return (None,) * 5 + none_tail
        if functorch_active() or batched(dy) or differentiable_backward_wanted():
            gate_bias = bias_for_composite(ctx, 0, gate_bias, "linear_glu")
            up_bias = bias_for_composite(ctx, 1, up_bias, "linear_glu")
            return _composite_glu_backward(dy, x, gate_weight, up_weight, gate_bias, up_bias, ctx.activation,
                                           needs) + none_tail
        if ctx.recompute:
            with torch.no_grad():
                _, z_gate, z_up = fwd_call(x, gate_weight, up_weight, gate_bias, up_bias, ctx.activation,
                                           ctx.extra, True)
        reuse = (z_gate, z_up) if ctx.recompute or saved_may_be_overwritten(ctx) else ()
        grads = bwd_call(dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, ctx.activation,
                         ctx.extra, needs, reuse)
        return tuple(g if need else None for g, need in zip(grads, needs)) + none_tail

    return setup_context, backward


def _composite_glu_backward(dy, x, gate_weight, up_weight, gate_bias, up_bias, activation, needs):
    """linear_glu's backward in PyTorch ops (see _composite_act_backward)."""
    dz_gate, dz_up = glu_dz(dy, F.linear(x, gate_weight, gate_bias), F.linear(x, up_weight, up_bias),
                            activations.get_gated(activation))
    grads = (dz_gate @ gate_weight + dz_up @ up_weight if needs[0] else None,
             dz_gate.t() @ x if needs[1] else None, dz_up.t() @ x if needs[2] else None,
             dz_gate.sum(0) if needs[3] else None, dz_up.sum(0) if needs[4] else None)
    return grads


def register_linear_glu_autograd(fwd_op: str, fwd_call, bwd_call, bias_read) -> None:
    setup_context, backward = linear_glu_autograd(fwd_call, bwd_call, bias_read=bias_read)
    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)
