"""Backend registry and the choice `auto` makes.

Names: `cuda` (native CUDA C++ / cuBLASLt), `triton`, `cpu` (native CPU), `torch` (composite of
PyTorch ops). Asking for a backend that cannot serve a call raises BackendUnavailableError naming
the reason; only `auto` falls back, and `python -m fastnn.info` shows what it picks.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch

from ..activations import Activation
from ..dropin import functorch_active
from .base import Backend, BackendUnavailableError, tf32_allowed
from .cpu import CpuBackend
from .cuda import CudaBackend
from .torch_backend import TorchBackend

BACKENDS: dict[str, Backend] = {"cuda": CudaBackend(), "cpu": CpuBackend(), "torch": TorchBackend()}

from . import triton as _triton  # noqa: E402  (registers its ops when triton is importable)

BACKENDS["triton"] = _triton.BACKEND

NAMES = ("auto", "cuda", "triton", "cpu", "torch")


def register(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def auto_order(device_type: str, act: Activation, dtype: torch.dtype = None) -> list[str]:
    """The backends `auto` tries, fastest first, for a device type, activation and dtype. Triton
    is left out for float32 without TF32: its exact (ieee) float32 dot runs on CUDA cores, behind
    cuBLAS's own float32 GEMM that the torch composite calls."""
    if device_type == "cpu":
        return ["cpu", "torch"]
    if device_type == "cuda":
        if dtype == torch.float32 and not tf32_allowed():
            return ["cuda", "torch"]
        return ["cuda", "triton", "torch"]
    return ["torch"]


def onnx_exporting() -> bool:
    """Whether torch.onnx.export (the torch.export-based exporter, torch's default) is running.
    Read from the exporter's own flag where it is loaded: torch.onnx is imported by nothing until a
    user imports it, and its public is_in_onnx_export costs microseconds per call."""
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    if flags is not None and hasattr(flags, "_is_onnx_exporting"):
        return bool(flags._is_onnx_exporting)
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and bool(onnx.is_in_onnx_export())


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def foreign_subclass(t) -> bool:
    """Whether t is a tensor subclass fastnn's ops do not know. They know fake and functional
    tensors (torch.compile, torch.export) and DTensor (their sharding rules); any other subclass,
    a quantised weight (torchao's quantize_ puts them in place on nn.Linear), a nested tensor, ...,
    would get fastnn's ops in its __torch_dispatch__, which has never heard of them, while F.linear
    and the activation are ATen ops it implements. (isinstance(t, nn.Parameter) is True for any
    subclass made a parameter, hence the exact types.)"""
    if t is None or type(t) in _PLAIN_TYPES:
        return False
    return not isinstance(t, _known_subclasses())


def _known_subclasses() -> tuple:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    known = (FakeTensor, FunctionalTensor)
    dtensor = sys.modules.get("torch.distributed.tensor")  # (a DTensor exists only once it is imported)
    return known + (dtensor.DTensor,) if dtensor is not None and hasattr(dtensor, "DTensor") else known


def resolve(requested: str, op: str, x: torch.Tensor, weights: Sequence[torch.Tensor],
            act: Activation, rest: Sequence = ()) -> str:
    """The backend that serves this call: `requested` itself, or for `auto` the first that can.
    `rest`: the call's other tensors (biases, ...), looked at for tensor subclasses only."""
    if requested not in NAMES:
        raise ValueError(f"fastnn.{op}: unknown backend {requested!r}; valid backends: {', '.join(NAMES)}")
    if functorch_active():
        # fastnn's kernels read raw pointers, which torch.func's wrapped tensors do not have
        if requested in ("auto", "torch"):
            return "torch"
        raise BackendUnavailableError(
            f"fastnn.{op}: backend {requested!r} cannot run under torch.func transforms (vmap, grad, jvp, "
            "jacrev, jacfwd) or forward-mode AD; backend='auto' runs PyTorch's composite there")
    if torch.jit.is_tracing():
        # torch.jit.trace (and the TorchScript ONNX exporter) records the ATen ops a call runs; the
        # kernels write through raw pointers it cannot see, so their trace would replay empty buffers
        if requested in ("auto", "torch"):
            return "torch"
        raise BackendUnavailableError(
            f"fastnn.{op}: backend {requested!r} cannot be recorded by torch.jit.trace (its kernels write "
            "through raw pointers the tracer does not see); backend='auto' records PyTorch's composite there")
    if onnx_exporting():
        # an ONNX model holds ONNX's own operators; fastnn's ops have none to become
        if requested in ("auto", "torch"):
            return "torch"
        raise BackendUnavailableError(
            f"fastnn.{op}: backend {requested!r} cannot be exported to ONNX (ONNX has no operator for "
            "fastnn's kernels); backend='auto' exports PyTorch's composite there")
    if requested == "auto":
        if any(foreign_subclass(t) for t in (x, *weights, *rest)):
            return "torch"  # (PyTorch's composite: ATen ops, which the subclass implements)
        for name in auto_order(x.device.type, act, x.dtype):
            backend = BACKENDS.get(name)
            if backend is not None and backend.unsupported_reason(op, x, weights, act) is None:
                return name
        return "torch"
    backend = BACKENDS.get(requested)
    if backend is None:
        raise BackendUnavailableError(f"fastnn.{op}: backend {requested!r} is not available in this build")
    reason = backend.unsupported_reason(op, x, weights, act)
    if reason is not None:
        raise BackendUnavailableError(f"fastnn.{op}: backend {requested!r} cannot serve this call: {reason}")
    return requested


__all__ = ["BACKENDS", "NAMES", "Backend", "BackendUnavailableError", "register", "resolve", "auto_order",
           "foreign_subclass"]
