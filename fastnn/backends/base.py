"""What every fastnn backend provides to the op layer (fastnn/ops.py).

Backends see 2-D x (rows, in_features), weights in nn.Linear layout (out_features, in_features)
and Activation objects; shapes, dtypes and devices were checked before they are called.
"""
from __future__ import annotations

import os

from typing import Optional, Sequence

import torch

from ..activations import Activation


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot serve this call (it names the backend and the reason)."""


class Backend:
    name = "?"

    def unsupported_reason(self, op: str, x: torch.Tensor, weights: Sequence[torch.Tensor],
                           act: Activation) -> Optional[str]:
        """None when this backend can serve the call, else why not (for the error message)."""
        raise NotImplementedError

    # -- linear_act ----------------------------------------------------------------------------
    def saved_spec(self, act: Activation, rows, cols, dtype: torch.dtype):
        """(shape, dtype) of what forward saves for backward (also what the fake kernel returns)."""
        if act.saves == "preact":
            return (rows, cols), dtype
        if act.saves == "mask":
            return (rows, (cols + 7) // 8), torch.uint8
        return (0,), dtype

    def linear_act_fwd(self, x, weight, bias, act: Activation, save: bool):
        """-> (y, saved); saved is empty when save is False or the activation needs nothing."""
        raise NotImplementedError

    def linear_act_y(self, x, weight, bias, act: Activation):
        """y alone, for a call with no gradient to give (no placeholder for what is not saved)."""
        return self.linear_act_fwd(x, weight, bias, act, False)[0]

    def linear_act_bwd(self, dy, x, weight, bias, saved, act: Activation, need_dx, need_dw, need_db,
                       reuse=()):
        """-> (dx, dw, db), None for those not needed. bias is the forward's (or None).

        reuse: tensors whose memory this call may take for its outputs (dZ, dX): ones nobody reads
        after it, such as a saved tensor autograd is about to free. dY and saved may be among them
        (dZ is formed element by element, each read before its own element is written). A backend
        may ignore them; the cpu and cuda backends write into them where shape and dtype fit (cpu:
        no fresh allocation and its page faults; cuda: a lower peak of memory), see
        fastnn/autograd.py for when this is safe."""
        raise NotImplementedError

    def backward_reads_bias(self, dtype: torch.dtype, act: Optional[Activation]) -> bool:
        """Whether linear_act_bwd / linear_glu_bwd / act_hidden / glu_hidden read the forward's bias
        for this dtype and activation (act None: a gated unit's up projection), i.e. whether what
        the forward saved lacks it. Where they do, autograd keeps a copy for them (fastnn/autograd.py)."""
        return False

    # -- linear_glu ----------------------------------------------------------------------------
    def linear_glu_fwd(self, x, gate_weight, up_weight, gate_bias, up_bias, gate_act: Activation,
                       save: bool):
        """-> (y, z_gate, z_up): what backward needs of the two pre-activations (empty when save
        is False)."""
        raise NotImplementedError

    def linear_glu_y(self, x, gate_weight, up_weight, gate_bias, up_bias, gate_act: Activation):
        """y alone, for a call with no gradient to give (as linear_act_y)."""
        return self.linear_glu_fwd(x, gate_weight, up_weight, gate_bias, up_bias, gate_act, False)[0]

    def linear_glu_bwd(self, dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up,
                       gate_act: Activation, need_dx, need_dwg, need_dwu, need_dbg, need_dbu, reuse=()):
        """-> (dx, d_gate_weight, d_up_weight, d_gate_bias, d_up_bias), None for those not needed.
        reuse: as for linear_act_bwd (z_gate, z_up and dY may be among them)."""
        raise NotImplementedError


    # -- the MLP block (fastnn/block.py) --------------------------------------------------------
    def hidden_grad(self, dy, w2, saved, act: Activation, reuse=()):
        """fc1's pre-activation gradient dZ1 = (dY @ W2) * act'(z1) in one pass (fc2's dgrad GEMM
        with fc1's act' as its epilogue), from linear_act_fwd's saved tensor; None where the
        backend has no such kernel: the block then runs fc2's dgrad and fc1's fused backward.
        reuse: as for linear_act_bwd (the hidden activation h, once fc2's weight gradient has read it)."""
        return None

    def rebuilds_hidden(self, act: Activation, gated: bool) -> bool:
        """Whether act_hidden (gated: glu_hidden) rebuilds this unit's hidden activation from what
        the forward saved, bit for bit the forward's (act: the gate's activation when gated)."""
        return False

    def act_hidden(self, saved, bias, act: Activation):
        """h = act(z) again from linear_act_fwd's saved pre-activation, bit for bit the forward's."""
        raise NotImplementedError

    def glu_hidden(self, z_gate, z_up, gate_bias, up_bias, gate_act: Activation):
        """h = act(z_gate) * z_up again from linear_glu_fwd's saved tensors, bit for bit."""
        raise NotImplementedError


class Reusable:
    """The tensors a backward may write its outputs into (Backend.linear_act_bwd's `reuse`), handed
    out by shape and dtype, each at most once; `empty(shape, dtype, device)` makes a tensor where
    none fits. Only contiguous ones are kept (the outputs are row-major)."""

    def __init__(self, tensors, empty):
        self.free = [t for t in tensors if t is not None and t.numel() > 0 and t.is_contiguous()]
        self.empty = empty

    def discard(self, t):
        """t is still to be read: none of its memory may be handed out."""
        self.free = [f for f in self.free if f.data_ptr() != t.data_ptr()]

    def find(self, shape, like):
        """A free tensor of this shape and like's dtype (no longer free), else None."""
        for i, t in enumerate(self.free):
            if tuple(t.shape) == tuple(shape) and t.dtype == like.dtype and t.device == like.device:
                return self.free.pop(i)
        return None

    def take(self, shape, like):
        """A free tensor of this shape and like's dtype, else a new one."""
        t = self.find(shape, like)
        return self.empty(shape, like.dtype, like.device) if t is None else t


def empty_like_nothing(x: torch.Tensor) -> torch.Tensor:
    """The placeholder for a tensor an op must return but has nothing for (a saved tensor or a
    gradient that is not needed): custom ops cannot return None."""
    return x.new_empty((0,))


def or_nothing(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return empty_like_nothing(like) if t is None else t


def interpreting() -> bool:
    """Whether Triton's interpreter is asked for (TRITON_INTERPRET set, not 0): Triton's kernels then
    run on CPU tensors. Here, not in triton_kernels/common.py, so that the triton backend can ask
    before importing Triton."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tf32_allowed() -> bool:
    """Whether torch lets float32 CUDA matmuls use TF32. torch >= 2.9 keeps the setting in
    torch.backends.cuda.matmul.fp32_precision ("tf32", "ieee", or "none": inherit the global
    torch.backends.fp32_precision), which also reflects the legacy allow_tf32 and
    set_float32_matmul_precision; reading allow_tf32 itself there warns on every call and raises
    once the new API was used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"
