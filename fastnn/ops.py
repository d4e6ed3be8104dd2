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
ops through torch.library.triton_op (fastnn/backends/triton.py) with the same autograd rules
(fastnn/autograd.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import activations, flops
from .autograd import (linear_act_autograd, linear_glu_autograd, register_linear_act_autograd,
                       register_linear_glu_autograd)
from .backends import BACKENDS
from .backends.base import empty_like_nothing as _nothing
from .backends.base import or_nothing as _or_nothing


# ---------------------------------------------------------------------------------------------
# the bias as the forward saw it (fastnn/autograd.py, keep_bias)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastnn::kept_copy", mutates_args=())
def kept_copy(t: Tensor) -> Tensor:
    """A copy of t (a bias as the forward saw it, for backward) that torch.compile's partitioner
    cannot recompute in backward from t itself, as it may a clone: backward then reads the copy even
    where t changed in place in between (autograd.keep_bias)."""
    return t.clone()


@kept_copy.register_fake
def _(t):
    return torch.empty_like(t)


def _backward_reads_bias(dtype, act, extra):
    """Whether the backend (extra[0]) reads the bias in backward: autograd.keep_bias then keeps a copy."""
    return BACKENDS[extra[0]].backward_reads_bias(dtype, act)


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


register_linear_act_autograd(
    "fastnn::linear_act_fwd",
    lambda x, w, b, act, extra, save: torch.ops.fastnn.linear_act_fwd(x, w, b, act, extra[0], save),
    # (an op never overwrites its inputs: `reuse` is for the eager twin alone)
    lambda dy, x, w, b, saved, act, extra, ndx, ndw, ndb, reuse: torch.ops.fastnn.linear_act_bwd(
        dy, x, w, b, saved, act, extra[0], ndx, ndw, ndb),
    _backward_reads_bias,
)


def _eager_act_fwd(x, weight, bias, activation, extra, save):
    return BACKENDS[extra[0]].linear_act_fwd(x, weight, bias, activations.get(activation), save)


def _eager_act_bwd(dy, x, weight, bias, saved, activation, extra, need_dx, need_dw, need_db, reuse):
    return BACKENDS[extra[0]].linear_act_bwd(dy, x, weight, bias, saved, activations.get(activation),
                                             need_dx, need_dw, need_db, reuse=reuse)


_act_setup, _act_backward = linear_act_autograd(_eager_act_fwd, _eager_act_bwd, private_saved=True,
                                                bias_read=_backward_reads_bias)


class LinearActFunction(torch.autograd.Function):
    """Eager twin of fastnn::linear_act_fwd: the same forward, setup_context and backward, called
    without the dispatcher round trips of a torch.library op (tens of microseconds per call, which
    small and decode-sized calls cannot afford). Under torch.compile fastnn uses the op. It returns
    y alone and keeps `saved` to itself, so that backward may write dZ over it (fastnn/autograd.py).
    (Old-style forward(ctx, ...): the setup_context style binds arguments through inspect on every
    call.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, backend, save):
        out = _eager_act_fwd(x, weight, bias, activation, (backend,), save)
        _act_setup(ctx, (x, weight, bias, activation, backend, save), out)
        return out[0]

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


register_linear_glu_autograd(
    "fastnn::linear_glu_fwd",
    lambda x, wg, wu, bg, bu, act, extra, save: torch.ops.fastnn.linear_glu_fwd(x, wg, wu, bg, bu, act, extra[0], save),
    lambda dy, x, wg, wu, bg, bu, zg, zu, act, extra, needs, reuse: torch.ops.fastnn.linear_glu_bwd(
        dy, x, wg, wu, bg, bu, zg, zu, act, extra[0], *needs),
    _backward_reads_bias,
)


def _eager_glu_fwd(x, wg, wu, bg, bu, activation, extra, save):
    return BACKENDS[extra[0]].linear_glu_fwd(x, wg, wu, bg, bu, activations.get_gated(activation), save)


def _eager_glu_bwd(dy, x, wg, wu, bg, bu, zg, zu, activation, extra, needs, reuse):
    return BACKENDS[extra[0]].linear_glu_bwd(dy, x, wg, wu, bg, bu, zg, zu, activations.get_gated(activation),
                                             *needs, reuse=reuse)


_glu_setup, _glu_backward = linear_glu_autograd(_eager_glu_fwd, _eager_glu_bwd, private_saved=True,
                                                bias_read=_backward_reads_bias)


class LinearGluFunction(torch.autograd.Function):
    """Eager twin of fastnn::linear_glu_fwd (see LinearActFunction)."""

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, gate_bias, up_bias, activation, backend, save):
        inputs = (x, gate_weight, up_weight, gate_bias, up_bias, activation, backend, save)
        out = _eager_glu_fwd(*inputs[:6], (backend,), save)
        _glu_setup(ctx, inputs, out)
        return out[0]

    backward = staticmethod(_glu_backward)


flops.register(torch.ops.fastnn.linear_act_fwd, torch.ops.fastnn.linear_act_bwd, torch.ops.fastnn.linear_glu_fwd,
               torch.ops.fastnn.linear_glu_bwd)


def use_ops(*tensors) -> bool:
    """Whether to go through the torch.library ops rather than the eager autograd.Functions:
    under torch.compile / export, for tensor subclasses (fake tensors, DTensor, ...), which the ops
    know how to dispatch and raw pointers do not, and under a TorchDispatchMode (make_fx's tracer,
    selective checkpointing, FlopCounterMode, ...), which sees the ATen ops a call runs but not the
    kernels' writes through raw pointers: it sees the op instead (a real-tensor make_fx trace of
    the kernels replayed empty buffers)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(t is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)
               for t in tensors)
