"""fastnn's operators, registered through torch.library: the op schema, the fake kernel (for
torch.compile and meta tensors) and the autograd registration side by side.

    fastnn::linear_act_fwd(x, weight, bias, activation, backend, save) -> (y, saved)
    fastnn::linear_act_bwd(dy, x, weight, bias, saved, activation, backend, need_dx, need_dw, need_db)
        -> (dx, dw, db)
    fastnn::linear_glu_fwd(x, gate_weight, up_weight, gate_bias, up_bias, activation, backend, save)
        -> (y, z_gate, z_up)
    fastnn::linear_glu_bwd(dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up,
                           activation, backend, need_dx, need_dwg, need_dwu, need_dbg, need_dbu)
        -> (dx, d_gate_weight, d_up_weight, d_gate_bias, d_up_bias)

x is 2-D here (fastnn.functional flattens the leading dims). `saved` is what backward needs:
nothing (an empty tensor), the sign mask or the pre-activation, as the backend lays it out;
gradients that are not needed come back as empty tensors. The Triton backend registers its own
ops through torch.library.triton_op (fastnn/backends/triton.py) with the same autograd helpers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import activations
from .dropin import batched, functorch_active
from .backends import BACKENDS
from .backends.base import empty_like_nothing as _nothing
from .backends.base import or_nothing as _or_nothing


# ---------------------------------------------------------------------------------------------
# linear_act
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastnn::linear_act_fwd", mutates_args=())
def linear_act_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str,
                   save: bool) -> tuple[Tensor, Tensor]:
    return BACKENDS[backend].linear_act_fwd(x, weight, bias, activations.get(activation), save)


@linear_act_fwd.register_fake
def _(x, weight, bias, activation, backend, save):
    act = activations.get(activation)
    y = x.new_empty((x.shape[0], weight.shape[0]))
    if not save or act.saves == "nothing":
        return y, _nothing(x)
    shape, dtype = BACKENDS[backend].saved_spec(act, x.shape[0], weight.shape[0], x.dtype)
    return y, x.new_empty(shape, dtype=dtype)


@torch.library.custom_op("fastnn::linear_act_bwd", mutates_args=())
def linear_act_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], saved: Tensor, activation: str,
                   backend: str, need_dx: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    act = activations.get(activation)
    dx, dw, db = BACKENDS[backend].linear_act_bwd(dy, x, weight, bias, saved, act, need_dx, need_dw, need_db)
    return _or_nothing(dx, dy), _or_nothing(dw, dy), _or_nothing(db, dy)


@linear_act_bwd.register_fake
def _(dy, x, weight, bias, saved, activation, backend, need_dx, need_dw, need_db):
    # x is an empty stand-in unless dW is needed, weight unless dX is
    dx = dy.new_empty((dy.shape[0], weight.shape[1])) if need_dx else _nothing(dy)
    dw = dy.new_empty((dy.shape[1], x.shape[1])) if need_dw else _nothing(dy)
    db = dy.new_empty((dy.shape[1],)) if need_db else _nothing(dy)
    return dx, dw, db


def linear_act_autograd(fwd_call, bwd_call):
    """(setup_context, backward) for a linear_act forward whose inputs are
    (x, weight, bias, activation, *extra, save) and whose outputs are (y, saved).

    fwd_call(x, weight, bias, activation, extra, save) -> (y, saved) runs the forward op;
    bwd_call(dy, x, weight, bias, saved, activation, extra, need_dx, need_dw, need_db) -> (dx, dw, db).
    Backward keeps only what it will use: x for dW, weight for dX, the bias (a parameter, already
    alive) and the backend's `saved`.
    A forward run with save=False (fastnn's recompute mode, or a raw call of the op) keeps the
    inputs instead and recomputes `saved` in backward.
    """

    def setup_context(ctx, inputs, output):
        x, weight, bias, activation = inputs[:4]
        save = inputs[-1]
        ctx.activation, ctx.extra = activation, tuple(inputs[4:-1])
        ctx.has_bias = bias is not None
        ctx.recompute = not save and activations.get(activation).saves != "nothing"
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        keep_x, keep_w = need_dw or ctx.recompute, need_dx or ctx.recompute
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero-filled gradient for `saved` (a full y-sized fill)
        ctx.save_for_backward(x if keep_x else None, weight if keep_w else None, bias, output[1])

    def backward(ctx, dy, _dsaved):
        x, weight, bias, saved = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        tail = (None, *([None] * len(ctx.extra)), None)
        if dy is None or not (need_dx or need_dw or need_db):
            return (None, None, None) + tail
        if functorch_active() or batched(dy):
            return _composite_act_backward(dy, x, weight, bias, ctx.activation, need_dx, need_dw, need_db) + tail
        if ctx.recompute:
            with torch.no_grad():
                _, saved = fwd_call(x, weight, bias, ctx.activation, ctx.extra, True)
        # empty stand-ins for the inputs that were not kept: backends read x only for dW and
        # weight only for dX
        x = x if x is not None else _nothing(dy)
        weight = weight if weight is not None else _nothing(dy)
        dx, dw, db = bwd_call(dy, x, weight, bias, saved, ctx.activation, ctx.extra, need_dx, need_dw, need_db)
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None) + tail

    return setup_context, backward


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _composite_act_backward(dy, x, weight, bias, activation, need_dx, need_dw, need_db):
    """linear_act's backward in PyTorch ops, z recomputed from the inputs: for a backward that runs
    under a torch.func transform although its forward did not (autograd.functional.jacobian with
    vectorize=True, autograd.grad with is_grads_batched=True vmap over the grad outputs), where
    fastnn's kernels cannot read the batched tensors."""
    if (need_dx or need_dw or need_db) and (x is None or weight is None):
        raise RuntimeError(
            "fastnn.linear_act: a backward vmapped over its grad outputs (jacobian(vectorize=True), "
            "is_grads_batched=True) needs x and weight, which this forward did not keep because only one "
            "of them needs a gradient; use vectorize=False or backend='torch' for this call")
    ct = _compute_dtype(dy.dtype)
    dz = (dy.to(ct) * activations.get(activation).grad(F.linear(x, weight, bias).to(ct))).to(dy.dtype)
    return (dz @ weight if need_dx else None, dz.t() @ x if need_dw else None,
            dz.sum(0) if need_db else None)


def register_linear_act_autograd(fwd_op: str, fwd_call, bwd_call) -> None:
    setup_context, backward = linear_act_autograd(fwd_call, bwd_call)
    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


register_linear_act_autograd(
    "fastnn::linear_act_fwd",
    lambda x, w, b, act, extra, save: torch.ops.fastnn.linear_act_fwd(x, w, b, act, extra[0], save),
    lambda dy, x, w, b, saved, act, extra, ndx, ndw, ndb: torch.ops.fastnn.linear_act_bwd(
        dy, x, w, b, saved, act, extra[0], ndx, ndw, ndb),
)


def _eager_act_fwd(x, weight, bias, activation, extra, save):
    return BACKENDS[extra[0]].linear_act_fwd(x, weight, bias, activations.get(activation), save)


def _eager_act_bwd(dy, x, weight, bias, saved, activation, extra, need_dx, need_dw, need_db):
    return BACKENDS[extra[0]].linear_act_bwd(dy, x, weight, bias, saved, activations.get(activation),
                                             need_dx, need_dw, need_db)


_act_setup, _act_backward = linear_act_autograd(_eager_act_fwd, _eager_act_bwd)


class LinearActFunction(torch.autograd.Function):
    """Eager twin of fastnn::linear_act_fwd: the same forward, setup_context and backward, called
    without the dispatcher round trips of a torch.library op (tens of microseconds per call, which
    small and decode-sized calls cannot afford). Under torch.compile fastnn uses the op. (Old-style
    forward(ctx, ...): the setup_context style binds arguments through inspect on every call.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, backend, save):
        out = _eager_act_fwd(x, weight, bias, activation, (backend,), save)
        _act_setup(ctx, (x, weight, bias, activation, backend, save), out)
        return out

    backward = staticmethod(_act_backward)


# ---------------------------------------------------------------------------------------------
# linear_glu
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastnn::linear_glu_fwd", mutates_args=())
def linear_glu_fwd(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Optional[Tensor],
                   up_bias: Optional[Tensor], activation: str, backend: str,
                   save: bool) -> tuple[Tensor, Tensor, Tensor]:
    return BACKENDS[backend].linear_glu_fwd(x, gate_weight, up_weight, gate_bias, up_bias,
                                            activations.get_gated(activation), save)


@linear_glu_fwd.register_fake
def _(x, gate_weight, up_weight, gate_bias, up_bias, activation, backend, save):
    shape = (x.shape[0], gate_weight.shape[0])
    y = x.new_empty(shape)
    if not save:
        return y, _nothing(x), _nothing(x)
    return y, x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("fastnn::linear_glu_bwd", mutates_args=())
def linear_glu_bwd(dy: Tensor, x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Optional[Tensor],
                   up_bias: Optional[Tensor], z_gate: Tensor, z_up: Tensor, activation: str, backend: str,
                   need_dx: bool, need_dwg: bool, need_dwu: bool, need_dbg: bool,
                   need_dbu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = BACKENDS[backend].linear_glu_bwd(dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up,
                                             activations.get_gated(activation), need_dx, need_dwg,
                                             need_dwu, need_dbg, need_dbu)
    return tuple(_or_nothing(g, dy) for g in grads)


@linear_glu_bwd.register_fake
def _(dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, activation, backend, need_dx, need_dwg,
      need_dwu, need_dbg, need_dbu):
    n_out = gate_weight.shape[0]
    return (
        dy.new_empty((dy.shape[0], gate_weight.shape[1])) if need_dx else _nothing(dy),
        dy.new_empty(gate_weight.shape) if need_dwg else _nothing(dy),
        dy.new_empty(up_weight.shape) if need_dwu else _nothing(dy),
        dy.new_empty((n_out,)) if need_dbg else _nothing(dy),
        dy.new_empty((n_out,)) if need_dbu else _nothing(dy),
    )


def linear_glu_autograd(fwd_call, bwd_call):
    """(setup_context, backward) for a linear_glu forward whose inputs are
    (x, gate_weight, up_weight, gate_bias, up_bias, activation, *extra, save).

    fwd_call(x, gate_weight, up_weight, gate_bias, up_bias, activation, extra, save) runs the op;
    bwd_call(dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, activation, extra,
             needs) -> 5 grads,
    needs = (dx, d_gate_weight, d_up_weight, d_gate_bias, d_up_bias). With save=False the
    pre-activations are recomputed in backward from the kept inputs.
    """

    def setup_context(ctx, inputs, output):
        x, gate_weight, up_weight, gate_bias, up_bias, activation = inputs[:6]
        ctx.activation, ctx.extra = activation, tuple(inputs[6:-1])
        ctx.has_bias = (gate_bias is not None, up_bias is not None)
        ctx.recompute = not inputs[-1]
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, gate_weight, up_weight, gate_bias, up_bias, output[1], output[2])

    def backward(ctx, dy, _dzg, _dzu):
        x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = (n[0], n[1], n[2], ctx.has_bias[0] and n[3], ctx.has_bias[1] and n[4])
        none_tail = (None, *([None] * len(ctx.extra)), None)
        if dy is None or not any(needs):
            return (None,) * 5 + none_tail
        if functorch_active() or batched(dy):
            return _composite_glu_backward(dy, x, gate_weight, up_weight, gate_bias, up_bias, ctx.activation,
                                           needs) + none_tail
        if ctx.recompute:
            with torch.no_grad():
                _, z_gate, z_up = fwd_call(x, gate_weight, up_weight, gate_bias, up_bias, ctx.activation,
                                           ctx.extra, True)
        grads = bwd_call(dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, ctx.activation,
                         ctx.extra, needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + none_tail

    return setup_context, backward


def _composite_glu_backward(dy, x, gate_weight, up_weight, gate_bias, up_bias, activation, needs):
    """linear_glu's backward in PyTorch ops (see _composite_act_backward)."""
    act = activations.get_gated(activation)
    ct = _compute_dtype(dy.dtype)
    z_gate = F.linear(x, gate_weight, gate_bias).to(ct)
    z_up = F.linear(x, up_weight, up_bias).to(ct)
    dz_gate = (dy.to(ct) * z_up * act.grad(z_gate)).to(dy.dtype)
    dz_up = (dy.to(ct) * act.fn(z_gate)).to(dy.dtype)
    grads = (dz_gate @ gate_weight + dz_up @ up_weight if needs[0] else None,
             dz_gate.t() @ x if needs[1] else None, dz_up.t() @ x if needs[2] else None,
             dz_gate.sum(0) if needs[3] else None, dz_up.sum(0) if needs[4] else None)
    return grads


def register_linear_glu_autograd(fwd_op: str, fwd_call, bwd_call) -> None:
    setup_context, backward = linear_glu_autograd(fwd_call, bwd_call)
    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


register_linear_glu_autograd(
    "fastnn::linear_glu_fwd",
    lambda x, wg, wu, bg, bu, act, extra, save: torch.ops.fastnn.linear_glu_fwd(x, wg, wu, bg, bu, act, extra[0], save),
    lambda dy, x, wg, wu, bg, bu, zg, zu, act, extra, needs: torch.ops.fastnn.linear_glu_bwd(
        dy, x, wg, wu, bg, bu, zg, zu, act, extra[0], *needs),
)


def _eager_glu_fwd(x, wg, wu, bg, bu, activation, extra, save):
    return BACKENDS[extra[0]].linear_glu_fwd(x, wg, wu, bg, bu, activations.get_gated(activation), save)


def _eager_glu_bwd(dy, x, wg, wu, bg, bu, zg, zu, activation, extra, needs):
    return BACKENDS[extra[0]].linear_glu_bwd(dy, x, wg, wu, bg, bu, zg, zu, activations.get_gated(activation),
                                             *needs)


_glu_setup, _glu_backward = linear_glu_autograd(_eager_glu_fwd, _eager_glu_bwd)


class LinearGluFunction(torch.autograd.Function):
    """Eager twin of fastnn::linear_glu_fwd (see LinearActFunction)."""

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, gate_bias, up_bias, activation, backend, save):
        inputs = (x, gate_weight, up_weight, gate_bias, up_bias, activation, backend, save)
        out = _eager_glu_fwd(*inputs[:6], (backend,), save)
        _glu_setup(ctx, inputs, out)
        return out

    backward = staticmethod(_glu_backward)


def use_ops(*tensors) -> bool:
    """Whether to go through the torch.library ops rather than the eager autograd.Functions:
    under torch.compile / export, and for tensor subclasses (fake tensors, DTensor, ...), which the
    ops know how to dispatch and raw pointers do not."""
    if torch.compiler.is_compiling():
        return True
    return any(t is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)
               for t in tensors)
