"""The `triton` backend: fused GEMM + bias + activation kernels written in Triton
(triton_kernels/, installed as fastnn.triton_kernels), registered through torch.library.triton_op
and wrap_triton so that torch.compile sees the kernels themselves. The autograd of linear_act and
linear_glu is the same as the other backends' (fastnn/ops.py).

    fastnn::triton_linear_act_fwd(x, weight, bias, activation, save) -> (y, saved)
    fastnn::triton_linear_act_bwd(dy, x, weight, bias, saved, activation, need_dx, need_dw, need_db)
    fastnn::triton_linear_glu_fwd(x, gate_weight, up_weight, gate_bias, up_bias, activation, save)
        -> (y, A, B)     A = act(z_gate), B = z_up * act'(z_gate)
    fastnn::triton_linear_glu_bwd(dy, x, gate_weight, up_weight, gate_bias, up_bias, A, B, activation,
                                  need_dx, need_dwg, need_dwu, need_dbg, need_dbu)

`saved` is the sign mask (relu, leaky_relu) or D = act'(z) in the input dtype: see
triton_kernels/linear_act.py for why backward reads the derivative rather than z.

Triton decides at kernel definition whether kernels run compiled or interpreted: to run them on
CPU tensors, set TRITON_INTERPRET=1 before importing fastnn.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .. import activations, flops
from ..autograd import register_linear_act_autograd, register_linear_glu_autograd
from .base import Backend, interpreting, or_nothing


def _cannot_run_here() -> Optional[str]:
    """Why no Triton kernel can run in this process, or None. Triton is imported only where its
    kernels can run: with a torch built for CUDA (or ROCm), or with Triton's interpreter asked for
    (TRITON_INTERPRET=1 before importing fastnn, for CPU tensors). With torch's CPU build, importing
    it, with the torch._inductor modules that torch.library.triton_op brings, took 1.6 s of `import
    fastnn`'s 3.6 s (Xeon, 2 cores) for a backend that could not serve a call. (The build, not
    torch.cuda.is_available(): that initialises the CUDA driver, after which a fork cannot use CUDA.)"""
    if interpreting() or torch_built_for_gpu():
        return None
    return "this torch is a CPU build, and TRITON_INTERPRET=1 was not set before importing fastnn"


def torch_built_for_gpu() -> bool:
    """Whether this torch is built for CUDA or ROCm (whether or not a GPU is present)."""
    return torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None


IMPORT_ERROR: Optional[str] = _cannot_run_here()
if IMPORT_ERROR is None:
    try:
        import triton  # noqa: F401

        from ..triton_kernels import linear_act as K_act
        from ..triton_kernels import linear_glu as K_glu
        from ..triton_kernels.common import interpreter_fault, pointers_real

        # (checked here, at import: inside a torch.compile trace the probe's launch could not run)
        IMPORT_ERROR = interpreter_fault()
    except Exception as exc:  # noqa: BLE001 -- any failure means: no triton backend here
        IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _save_mode(act, save):
    """triton_kernels.linear_act's save mode (forward stores a threshold activation's D as any other)."""
    if not save or act.saves == "nothing":
        return 0
    if act.saves == "mask":
        return 1
    return 3 if act.threshold else 2


class TritonBackend(Backend):
    name = "triton"

    def unsupported_reason(self, op, x, weights, act):
        if IMPORT_ERROR is not None:
            return f"triton is not usable here ({IMPORT_ERROR})"
        if x.device.type == "cuda":
            if interpreting():
                return "TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only"
        elif x.device.type == "cpu":
            if not interpreting():
                return "it needs a CUDA device (or TRITON_INTERPRET=1 set before importing fastnn, for CPU tensors)"
        else:
            return f"it runs on CUDA tensors; these are on {x.device}"
        if x.dtype not in _DTYPES:
            return f"it supports float32, bfloat16 and float16, not {x.dtype}"
        return None

    # Backend methods, used by the eager path of the op layer (same kernels, no dispatcher)
    def linear_act_fwd(self, x, weight, bias, act, save):
        with _device_of(x):
            return K_act.forward(x, weight, bias, act.code, _save_mode(act, save))

    def linear_act_bwd(self, dy, x, weight, bias, saved, act, need_dx, need_dw, need_db, reuse=()):
        with _device_of(dy):
            return _act_bwd(dy, x, weight, saved, act, need_dx, need_dw, need_db, lambda k: k)

    def linear_glu_fwd(self, x, gate_weight, up_weight, gate_bias, up_bias, gate_act, save):
        with _device_of(x):
            return K_glu.forward(x, gate_weight, up_weight, gate_bias, up_bias, gate_act.code, save)

    def linear_glu_bwd(self, dy, x, gate_weight, up_weight, gate_bias, up_bias, a, b, gate_act,
                       need_dx, need_dwg, need_dwu, need_dbg, need_dbu, reuse=()):
        with _device_of(dy):
            return K_glu.backward(dy.contiguous(), x, gate_weight, up_weight, a, b, need_dx, need_dwg, need_dwu,
                                  need_dbg, need_dbu, gate_threshold=gate_act.threshold)

    def hidden_grad(self, dy, w2, saved, act, reuse=()):
        # fc2's dgrad kernel, fc1's saved act' factor (or sign mask) multiplied in as the tile is stored
        with _device_of(dy):
            return K_act.dgrad(dy.contiguous(), dy, 0, act.name == "leaky_relu", w2, epilogue=saved,
                               epilogue_mode=_save_mode(act, True))


def _device_of(t):
    """Triton launches on the current device and its current stream: make that the tensors' device
    (cuda:1 tensors otherwise get a kernel on cuda:0)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _act_bwd(dy, x, weight, saved, act, need_dx, need_dw, need_db, wrap):
    dy = dy.contiguous()
    mode = _save_mode(act, True)
    leaky = act.name == "leaky_relu"
    dx = K_act.dgrad(dy, saved, mode, leaky, weight, wrap=wrap) if need_dx else None
    dw, db = K_act.wgrad(dy, saved, mode, leaky, x, need_dw, need_db, wrap=wrap)
    return dx, dw, db


class _ShapesOnly:
    """wrap_triton under the interpreter, where it hands back the kernel itself: a run of the op's
    fake kernel (the op's own body on fake tensors, for output shapes: DTensor's sharding
    propagation) launches nothing, instead of interpreting the kernel on tensors without data."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            if not pointers_real(*(a for a in args if isinstance(a, Tensor))):
                return None
            return launch(*args, **kwargs)
        return run


def register_ops():
    """Defines the fastnn::triton_* ops and their autograd (once, when triton is importable)."""
    from torch.library import triton_op
    from torch.library import wrap_triton as _wrap_triton

    def wrap_triton(kernel):
        return _ShapesOnly(kernel) if interpreting() else _wrap_triton(kernel)

    def op(name):
        """triton_op on a GPU, so that torch.compile sees the kernels; under the interpreter an opaque
        custom op whose fake kernel is its own body (shapes only, _ShapesOnly), as triton_op's is.
        (A compiled graph inlines a triton_op's body, whose launches _ShapesOnly drops while it
        traces: it ran uninitialised outputs, NaN, where an opaque op runs the interpreter.)"""
        if not interpreting():
            return triton_op(name, mutates_args=())

        def define(fn):
            defined = torch.library.custom_op(name, mutates_args=())(fn)
            defined.register_fake(fn)
            return defined
        return define

    @op("fastnn::triton_linear_act_fwd")
    def triton_linear_act_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                              save: bool) -> tuple[Tensor, Tensor]:
        act = activations.get(activation)
        return K_act.forward(x, weight, bias, act.code, _save_mode(act, save), wrap=wrap_triton)

    @op("fastnn::triton_linear_act_bwd")
    def triton_linear_act_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], saved: Tensor,
                              activation: str, need_dx: bool, need_dw: bool,
                              need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
        act = activations.get(activation)
        dx, dw, db = _act_bwd(dy, x, weight, saved, act, need_dx, need_dw, need_db, wrap_triton)
        return or_nothing(dx, dy), or_nothing(dw, dy), or_nothing(db, dy)

    @op("fastnn::triton_linear_glu_fwd")
    def triton_linear_glu_fwd(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Optional[Tensor],
                              up_bias: Optional[Tensor], activation: str, save: bool) -> tuple[Tensor, Tensor, Tensor]:
        act = activations.get_gated(activation)
        return K_glu.forward(x, gate_weight, up_weight, gate_bias, up_bias, act.code, save, wrap=wrap_triton)

    @op("fastnn::triton_linear_glu_bwd")
    def triton_linear_glu_bwd(dy: Tensor, x: Tensor, gate_weight: Tensor, up_weight: Tensor,
                              gate_bias: Optional[Tensor], up_bias: Optional[Tensor], a: Tensor, b: Tensor,
                              activation: str, need_dx: bool, need_dwg: bool, need_dwu: bool, need_dbg: bool,
                              need_dbu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        grads = K_glu.backward(dy.contiguous(), x, gate_weight, up_weight, a, b, need_dx, need_dwg, need_dwu,
                               need_dbg, need_dbu, gate_threshold=activations.get_gated(activation).threshold,
                               wrap=wrap_triton)
        return tuple(or_nothing(g, dy) for g in grads)

    register_linear_act_autograd(
        "fastnn::triton_linear_act_fwd",
        lambda x, w, b, act, extra, save: torch.ops.fastnn.triton_linear_act_fwd(x, w, b, act, save),
        lambda dy, x, w, b, saved, act, extra, ndx, ndw, ndb, reuse: torch.ops.fastnn.triton_linear_act_bwd(
            dy, x, w, b, saved, act, ndx, ndw, ndb),
        lambda dtype, act, extra: False,  # (the Triton kernels never read the bias in backward)
    )
    flops.register(torch.ops.fastnn.triton_linear_act_fwd, torch.ops.fastnn.triton_linear_act_bwd,
                   torch.ops.fastnn.triton_linear_glu_fwd, torch.ops.fastnn.triton_linear_glu_bwd)
    register_linear_glu_autograd(
        "fastnn::triton_linear_glu_fwd",
        lambda x, wg, wu, bg, bu, act, extra, save: torch.ops.fastnn.triton_linear_glu_fwd(x, wg, wu, bg, bu, act,
                                                                                            save),
        lambda dy, x, wg, wu, bg, bu, a, b, act, extra, needs, reuse: torch.ops.fastnn.triton_linear_glu_bwd(
            dy, x, wg, wu, bg, bu, a, b, act, *needs),
        lambda dtype, act, extra: False,
    )


BACKEND = TritonBackend()
if IMPORT_ERROR is None:
    register_ops()
