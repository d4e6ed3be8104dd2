"""Where a call's time goes: for each configuration of the benchmark (fastnn on each backend, eager
PyTorch), the host time per call and the device kernels one call launches, with their times.

The H200 run of 2026-12-04 had fastnn behind eager in every GPU row, most at small shapes; this
splits that gap into host work (Python, dispatch, launches) and device work (which kernels, how
long each), so that a short lease says which to attack.

  python benchmarks/profile_calls.py [--device cuda] [--shapes bert-base 16x4096x11008]
      [--dtype bfloat16] [--activation gelu] [--mode fwd fwd+bwd] [--backends cuda triton]

Host time per call: the wall time of a burst of calls on a tiny problem (16 x 64 -> 64), where the
device keeps up with whatever the host queues, so that the host side is what is timed; then
cProfile's split of it into the functions that spend it (own time per call). At each shape: the
wall time per call of calls back to back beside the device's busy time per call (torch.profiler,
each kernel's total over a few calls), so that a gap between them shows the device waiting on the
host; and on CUDA the runtime and driver API calls per call with their host time, where a
cudaMalloc, cudaFree or synchronize that should not be there shows itself (on a CPU, the top
operators' own CPU time instead of kernels). The mode "mlp" profiles the MLP block, fastnn.mlp at
each memory level beside eager.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_linear as bench  # noqa: E402  (its cases, inputs and configurations)

TINY = (16, 64, 64)
FASTNN_DIR = str(Path(bench.fastnn.__file__).resolve().parent)


def _configs(case, device, backends):
    inputs = bench.make_inputs(case, device)
    grad_out = bench.make_grad_out(case, device)
    cfgs = bench.build_configs(case, inputs, grad_out, device, backends, compile_modes=[], baselines=[])
    return [c for c in cfgs if c.run is not None and not c.name.startswith("bare GEMM")]


def us_per_call(run, device, calls=200, warmup=20, drained=False):
    """Microseconds per call of `calls` calls back to back after `warmup` ones: until the last call
    returns (the host's time, where the device keeps up), or with drained until the device has
    finished them too (the wall time)."""
    for _ in range(warmup):
        run()
    bench.sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        run()
    if drained:
        bench.sync(device)
    elapsed = time.perf_counter() - start
    bench.sync(device)
    return elapsed / calls * 1e6


def host_functions(run, device, calls=200, top=10):
    """([(function, calls per call, own us per call, cumulative us per call)] by own time: the
    Python functions and builtins (torch's C entry points among them) that take the host's time;
    the same rows for fastnn's own functions by cumulative time: how the time splits across its
    layers, functional -> autograd -> backend -> native call). cProfile over a burst of calls; its
    hooks add a little to each function call."""
    for _ in range(20):
        run()
    bench.sync(device)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        run()
    prof.disable()
    bench.sync(device)
    rows, ours = [], []
    for (path, line, name), (_, ncalls, own, cum, _) in pstats.Stats(prof).stats.items():
        where = f"{Path(path).name}:{line}({name})" if path != "~" else name
        row = (where, ncalls / calls, own / calls * 1e6, cum / calls * 1e6)
        rows.append(row)
        if path.startswith(FASTNN_DIR):
            ours.append(row)
    rows.sort(key=lambda r: -r[2])
    ours.sort(key=lambda r: -r[3])
    return rows[:top], ours[:top]


# CUDA runtime (cudaLaunchKernel, cudaMalloc, ...) and driver (cuLaunchKernelEx, ...) API calls, as
# torch.profiler records them on the host
_API_CALL = re.compile(r"^cu(da)?[A-Z]")


def device_kernels(run, device, calls=5, top=8):
    """(total device microseconds per call, [(kernel, launches per call, microseconds per call)],
    [(CUDA API call, calls per call, host microseconds per call)], the latter empty on a CPU)."""
    for _ in range(3):
        run()
    bench.sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        bench.sync(device)
    rows, api = [], []
    for e in prof.key_averages():
        on_host = getattr(e, "device_type", None) == torch.autograd.DeviceType.CPU
        if cuda and on_host and _API_CALL.match(e.key):
            api.append((e.key, e.count / calls, e.self_cpu_time_total / calls))
            continue
        own = getattr(e, "self_device_time_total", None) if cuda else e.self_cpu_time_total
        if cuda and own is None:
            own = getattr(e, "self_cuda_time_total", 0)
        if own and own > 0 and (not cuda or not on_host):
            rows.append((e.key, e.count / calls, own / calls))
    rows.sort(key=lambda r: -r[2])
    api.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows) if cuda else None
    return total, rows[:top], api[:top]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=None, help="MxKxN or the benchmark's presets")
    p.add_argument("--dtype", default=None, choices=list(bench.DTYPES))
    p.add_argument("--activation", default="gelu")
    p.add_argument("--mode", nargs="+", default=["fwd", "fwd+bwd"], choices=bench.MODES)
    p.add_argument("--backends", nargs="+", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    shapes = bench.parse_shapes(args.shapes or (["bert-base", "16x4096x11008"] if cuda else ["256x768x3072"]))
    backends = args.backends or [b for b in (("cuda", "triton") if cuda else ("cpu",)) if bench._usable(b, device)]
    print(f"profile_calls on {bench.device_name(device)}; torch {torch.__version__}; backends {', '.join(backends)}; "
          f"{dtype} {args.activation}")
    for mode in args.mode:
        tiny = bench.Case(*TINY, dtype, args.activation, mode)
        print(f"\nhost time per call, {tiny.label()} (device work negligible):")
        tiny_cfgs = _configs(tiny, device, backends)
        for cfg in tiny_cfgs:
            print(f"  {cfg.name:<28} {us_per_call(cfg.run, device):8.1f} us")
        for cfg in tiny_cfgs:
            print(f"\nwhere {cfg.name}'s host time goes, {tiny.label()} (cProfile, own time per call):")
            by_own, ours = host_functions(cfg.run, device)
            for name, count, us, _ in by_own:
                print(f"      {us:9.1f} us  x{count:<4.3g} {name[:90]}")
            if ours:
                print("  fastnn's functions by cumulative time per call (own time beside it):")
                for name, count, us, cum in ours:
                    print(f"      {cum:9.1f} us  ({us:6.1f} own)  x{count:<4.3g} {name[:80]}")
        for m, k, n in shapes:
            case = bench.Case(m, k, n, dtype, args.activation, mode)
            print(f"\n{'device kernels' if cuda else 'operators (own CPU time)'} per call, {case.label()}:")
            for cfg in _configs(case, device, backends):
                try:
                    wall = us_per_call(cfg.run, device, calls=5, warmup=3, drained=True)
                    total, rows, api = device_kernels(cfg.run, device)
                except Exception as exc:  # noqa: BLE001 -- one configuration's failure is reported, not fatal
                    print(f"  {cfg.name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    continue
                busy = f"; {total:.1f} us on the device ({total / wall:.0%} busy)" if total is not None else ""
                print(f"  {cfg.name}: {wall:.1f} us per call back to back{busy}")
                for name, count, us in rows:
                    print(f"      {us:9.1f} us  x{count:<4.3g} {name[:90]}")
                if api:
                    print("    CUDA API calls per call (host time):")
                    for name, count, us in api:
                        print(f"      {us:9.1f} us  x{count:<4.3g} {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
