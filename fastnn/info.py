"""`python -m fastnn.info`: what this fastnn build contains, what is usable here, and which
backend `auto` picks for each device and dtype."""
from __future__ import annotations

import json
import platform
import sys

import torch

from . import __version__, _native, activations, backends


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # noqa: BLE001 -- report any import failure as text
        return f"not importable ({type(exc).__name__}: {exc})"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """A readable name for a torch device, for benchmark records."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_name()} ({torch.get_num_threads()} threads)"
    return str(device)


def _devices():
    out = [{"type": "cpu", "name": cpu_name(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"type": "cuda", "index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_gib": round(p.total_memory / 2**30, 1)})
    return out


def _auto_choices(devices):
    """What `auto` picks for a representative call per device and dtype."""
    picks = {}
    act = activations.get("gelu")
    for dev in sorted({d["type"] for d in devices}):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            x = torch.empty(8, 64, dtype=dtype, device=dev)
            w = torch.empty(64, 64, dtype=dtype, device=dev)
            picks[f"{dev}/{str(dtype).replace('torch.', '')}"] = backends.resolve("auto", "linear_act", x, [w], act)
    return picks


def _backend_status(devices):
    status = {}
    act = activations.get("gelu")
    for name, backend in backends.BACKENDS.items():
        reasons = {}
        for dev in sorted({d["type"] for d in devices}):
            x = torch.empty(8, 64, device=dev)
            w = torch.empty(64, 64, device=dev)
            reasons[dev] = backend.unsupported_reason("linear_act", x, [w], act) or "usable"
        status[name] = reasons
    return status


def _cuda_paths():
    """On a GPU: one small training call of the cuda backend per dtype and activation, and which
    path served each (cuBLASLt's epilogue or fastnn's own kernels, as counted by the backend), with
    what the epilogue probes decided."""
    if not torch.cuda.is_available() or _native.cuda_module() is None:
        return None
    from . import functional
    from .backends import cuda as cuda_backend

    cuda_backend.reset_paths()
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(64, 128, dtype=dtype, device="cuda", requires_grad=True)
            w = torch.randn(192, 128, dtype=dtype, device="cuda", requires_grad=True)
            b = torch.randn(192, dtype=dtype, device="cuda", requires_grad=True)
            for act in activations.ACTIVATIONS:
                functional.linear_act(x, w, b, act, backend="cuda").sum().backward()
                with torch.no_grad():
                    functional.linear_act(x, w, b, act, backend="cuda")
            for gated in activations.GATED:
                functional.linear_glu(x, w, w, b, b, gated, backend="cuda").sum().backward()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 -- report, do not hide, what failed
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"paths": {" ".join(k): v for k, v in sorted(cuda_backend.paths().items())},
            "epilogue_trust": {" ".join(map(str, k)): v for k, v in sorted(cuda_backend.epilogue_trust().items())}}


def _cpu_16bit_gemm() -> dict:
    """How the cpu backend multiplies each 16-bit dtype here (see fastnn/backends/cpu.py)."""
    from .backends import cpu as cpu_backend

    def route(dt):
        if cpu_backend.gemm_in_float32(dt):
            return "float32 GEMM (torch has no native kernel for this CPU)"
        limit = cpu_backend.WGRAD_COPY_MIN_IN_FEATURES
        if cpu_backend.wgrad_from_copy(dt, limit):
            return (f"torch's own 16-bit GEMM; dW from a row-major copy of dZ^T from {limit} input features on, "
                    "where its rows fill whole 64-byte lines (32 rows)")
        return "torch's own 16-bit GEMM; dW from the view dZ.t()"

    return {str(dt).replace("torch.", ""): route(dt) for dt in (torch.bfloat16, torch.float16)}


def _cpu_huge_pages() -> str:
    """Whether the cpu backend's large buffers ask for transparent huge pages here."""
    from .backends import cpu as cpu_backend

    if cpu_backend._madvise() is not None:
        return "asked for (madvise) on buffers of 4 MiB and up"
    return cpu_backend.huge_pages_off_reason() or "not asked for: libc's madvise could not be loaded"


def _cpu_buffer_cache() -> str:
    """Whether the cpu backend keeps its large buffers to hand out again (BufferCache)."""
    from .backends import cpu as cpu_backend

    cache = cpu_backend.BUFFER_CACHE
    if cache._alone is None:
        return "off: this torch does not count a storage's references as the cache needs"
    if cache.limit_bytes <= 0:
        return "off (FASTNN_CPU_BUFFER_CACHE_MB=0)"
    return (f"on: buffers of {cache.MIN_BYTES / (1 << 20):g} MiB and up (FASTNN_CPU_BUFFER_CACHE_MIN_MB), "
            f"kept once free up to {cache.limit_bytes / (1 << 20):g} MiB (FASTNN_CPU_BUFFER_CACHE_MB)")


def collect() -> dict:
    native = {"cpu": None, "cuda": None}
    if _native._C is not None:
        native["cpu"] = dict(_native._C.build_info())
    else:
        native["cpu"] = f"not built or failed to load: {_native.C_IMPORT_ERROR}"
    cuda = _native.cuda_module()
    native["cuda"] = dict(cuda.build_info()) if cuda is not None else f"not available: {_native.cuda_module_error()}"
    devices = _devices()
    return {
        "fastnn": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "native": native,
        "devices": devices,
        "backends": _backend_status(devices),
        "auto_picks_for_gelu": _auto_choices(devices),
        "cpu_16bit_gemm": _cpu_16bit_gemm(),
        "cpu_huge_pages": _cpu_huge_pages(),
        "cpu_buffer_cache": _cpu_buffer_cache(),
        "cuda_paths": _cuda_paths(),
        "activations": list(activations.ACTIVATIONS),
        "gated_activations": list(activations.GATED),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return 0
    print(f"fastnn {info['fastnn']}  (python {info['python']}, torch {info['torch']}, "
          f"torch CUDA {info['torch_cuda']}, triton {info['triton']})")
    cpu = info["native"]["cpu"]
    if isinstance(cpu, dict):
        print(f"native CPU kernels: ISA levels compiled {cpu['cpu_isas_compiled']}, running {cpu['cpu_isa_active']}; "
              f"OpenMP {cpu['openmp']}; {cpu['compiler']}")
    else:
        print(f"native CPU kernels: {cpu}")
    cuda = info["native"]["cuda"]
    if isinstance(cuda, dict):
        print("native CUDA kernels: " + ", ".join(f"{k} {v}" for k, v in cuda.items()))
    else:
        print(f"native CUDA kernels: {cuda}")
    print("devices:")
    for d in info["devices"]:
        print("  " + ", ".join(f"{k}={v}" for k, v in d.items()))
    print("backends:")
    for name, per_dev in info["backends"].items():
        print(f"  {name:7s} " + "; ".join(f"{dev}: {why}" for dev, why in per_dev.items()))
    print("cpu backend, 16-bit GEMMs: " + "; ".join(f"{dt}: {how}" for dt, how in info["cpu_16bit_gemm"].items()))
    print(f"cpu backend, huge pages: {info['cpu_huge_pages']}")
    print(f"cpu backend, buffer cache: {info['cpu_buffer_cache']}")
    print("auto picks (linear_act, gelu):")
    for key, name in info["auto_picks_for_gelu"].items():
        print(f"  {key:18s} -> {name}")
    cuda_paths = info["cuda_paths"]
    if cuda_paths is not None:
        print("cuda backend, the path that served each call (op dtype activation: path calls):")
        if "error" in cuda_paths:
            print(f"  failed: {cuda_paths['error']}")
        else:
            for key, served in cuda_paths["paths"].items():
                print(f"  {key}: " + "; ".join(f"{path} x{n}" for path, n in served.items()))
            print("cuBLASLt activation epilogues, as probed (device dtype epilogue: trusted):")
            for key, ok in cuda_paths["epilogue_trust"].items():
                print(f"  {key}: {ok}")
    print("activations: " + ", ".join(info["activations"]))
    print("gated (linear_glu): " + ", ".join(info["gated_activations"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
