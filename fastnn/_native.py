"""Loading of the native modules and the codes they take.

fastnn._C (CPU kernels) is always built; fastnn._cuda (CUDA kernels, cuBLASLt) only where nvcc and
cuBLASLt were found at build time, and it is imported lazily, on first use, so that `import fastnn`
works on machines with no CUDA driver, runtime or cuBLAS.
"""
from __future__ import annotations

import importlib

import torch  # noqa: F401  -- first: _C links libgomp.so.1 and should share torch's copy

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

try:
    from . import _C  # type: ignore[attr-defined]

    C_IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # a source checkout that was never built
    _C = None
    C_IMPORT_ERROR = exc


def cpu_module():
    """fastnn._C, or a RuntimeError that says why it is missing."""
    if _C is None:
        raise RuntimeError(
            f"fastnn's native module fastnn._C is not built or failed to load ({C_IMPORT_ERROR}); "
            "install fastnn with `pip install .`"
        )
    return _C


_cuda_state: dict = {}


def _preload_cublaslt() -> bool:
    """Loads libcublasLt from an installed nvidia-cublas wheel, for a fastnn._cuda whose rpath
    cannot reach it (an in-place build). A CUDA build of torch has usually loaded it already."""
    import ctypes
    import importlib.util
    import os

    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for sub, name in (("cu13/lib", "libcublasLt.so.13"), ("cublas/lib", "libcublasLt.so.12")):
            path = os.path.join(base, sub, name)
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    return True
                except OSError:
                    continue
    return False


def cuda_module():
    """fastnn._cuda, imported on first use; None when it was not built or cannot load here."""
    if "module" not in _cuda_state:
        try:
            _cuda_state["module"] = importlib.import_module("fastnn._cuda")
            _cuda_state["error"] = None
        except ImportError as exc:
            _cuda_state["module"] = None
            _cuda_state["error"] = exc
            if "libcublasLt" in str(exc) and _preload_cublaslt():
                try:
                    _cuda_state["module"] = importlib.import_module("fastnn._cuda")
                    _cuda_state["error"] = None
                except ImportError as exc2:
                    _cuda_state["error"] = exc2
    return _cuda_state["module"]


def cuda_module_error() -> str | None:
    """Why fastnn._cuda is not usable (None when it is)."""
    cuda_module()
    err = _cuda_state.get("error")
    return None if err is None else str(err)


def num_threads() -> int:
    """Threads for the CPU kernels: torch's own setting (they share its OpenMP runtime)."""
    return max(1, torch.get_num_threads())
