"""Each configuration alone, as a training or inference loop runs it: fused_linear.py's cases, every
configuration timed in a process of its own, the processes alternating round by round.

    python benchmarks/steady_state.py --shapes 8192x256x1024 --dtype bfloat16 --mode fwd+bwd
    python benchmarks/steady_state.py --shapes 2048x768x3072 --mode mlp --rounds 4 \
        --ab FASTNN_CPU_BUFFER_CACHE_MIN_MB=32

Why beside fused_linear.py: there every configuration of a case runs interleaved in one process,
which cancels machine drift, but they share one malloc. On the CPU a buffer of a few MiB that malloc
maps afresh, or takes back from the top of its heap and hands out again, costs a page fault per
4 KiB on its first write, and whether it does depends on everything else in the heap: interleaved,
a configuration may get the chunk another one freed just before, warm, where alone it gets fresh
pages every step, or the reverse. Here each process runs one configuration's steps back to back
(after warm-up steps), as a loop does, and reports its median step time and its page faults per
step (minor faults, getrusage); the speed-up vs eager is the median over rounds of each round's
ratio. Results are not checked here (fused_linear.py checks every configuration it times).

--ab NAME=VALUE adds each fastnn configuration again, run with that environment variable (an A/B
of a setting read at import, e.g. FASTNN_CPU_BUFFER_CACHE_MIN_MB).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _minor_faults():
    try:
        import resource
    except ImportError:  # (not on Windows)
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(args):
    """One configuration of one case: warm-up steps, then timed steps; prints a JSON line."""
    import torch

    import fused_linear as bench

    m, k, n, dtype, activation, mode = args.case.split(",")
    case = bench.Case(int(m), int(k), int(n), dtype, activation, mode)
    device = torch.device(args.device)
    inputs = bench.make_inputs(case, device)
    grad_out = bench.make_grad_out(case, device)
    backend = args.config.split("[")[1].split("]")[0] if "[" in args.config else None
    compile_modes = ["default"] if args.config == "compile" else []
    cfgs = bench.build_configs(case, inputs, grad_out, device, [backend] if backend else [], compile_modes, [])
    cfg = next((c for c in cfgs if c.name == args.config), None)
    if cfg is None or cfg.unavailable:
        print(json.dumps({"error": cfg.unavailable if cfg else f"no configuration {args.config!r}"}))
        return 0
    for _ in range(args.warmup):
        cfg.run()
    bench.sync(device)
    times, faults = [], _minor_faults()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        cfg.run()
        bench.sync(device)
        times.append(time.perf_counter() - t0)
    after = _minor_faults()
    print(json.dumps({"median_s": statistics.median(times),
                      "faults": None if faults is None else (after - faults) / args.steps}))
    return 0


def _run_child(args, case, config, env_extra):
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, __file__, "--child", "--case", ",".join(str(v) for v in case), "--config", config,
           "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", nargs="+", default=["cpu"], help="MxKxN or fused_linear.py's presets")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--activation", nargs="+", default=["gelu"])
    p.add_argument("--mode", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd", "mlp"])
    p.add_argument("--configs", nargs="+", default=None,
                   help="configuration names as fused_linear.py prints them (default: eager, fastnn[DEVICE] "
                        "(fastnn.mlp[DEVICE] none in mlp mode) and bare GEMM)")
    p.add_argument("--ab", action="append", default=[], metavar="NAME=VALUE",
                   help="run each fastnn configuration again with this environment variable")
    p.add_argument("--rounds", type=int, default=3, help="processes per configuration, alternating")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first in each process")
    p.add_argument("--steps", type=int, default=50, help="timed steps in each process")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each process")
    args = p.parse_args(argv)
    if args.child:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        return child(args)

    import fused_linear as bench

    import fastnn
    from fastnn.info import device_name

    import torch
    device = torch.device(args.device)
    print(f"fastnn {fastnn.__version__} ({bench.environment(device)['git_commit']}) on "
          f"{device_name(device)}; torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}")
    print(f"each configuration alone in its own process: {args.warmup} warm-up steps, then the median of "
          f"{args.steps} timed steps; {args.rounds} rounds, alternating; vs eager: the median of the rounds' ratios")
    ab = [tuple(a.split("=", 1)) for a in args.ab]
    for (m, k, n) in bench.parse_shapes(args.shapes):
        for dtype in args.dtype:
            for act in args.activation:
                for mode in args.mode:
                    be = device.type
                    names = args.configs or ["eager", f"fastnn.mlp[{be}] none" if mode == "mlp" else f"fastnn[{be}]",
                                             "bare GEMM"]
                    runs = [(name, name, {}) for name in names]  # (label, configuration, environment)
                    runs += [(f"{name} {var}={value}", name, {var: value})
                             for name in names if name.startswith("fastnn") for var, value in ab]
                    case = (m, k, n, dtype, act, mode)
                    results = {label: [] for label, _, _ in runs}
                    for rnd in range(args.rounds):
                        start = rnd % len(runs)
                        for label, config, env in runs[start:] + runs[:start]:
                            results[label].append(_run_child(args, case, config, env))
                    _print_case(case, runs, results)
    return 0


def _print_case(case, runs, results):
    m, k, n, dtype, act, mode = case
    print(f"\n{m}x{k}x{n} (MxKxN) {dtype} {act} {mode}")
    width = max(len(label) for label, _, _ in runs)
    print(f"  {'config':{width}s} {'ms':>9s} {'vs eager':>8s} {'range':>11s} {'faults/step':>12s}  status")
    eager = results.get("eager", [])
    for label, _, _ in runs:
        got = results[label]
        errors = [r["error"] for r in got if "error" in r]
        if errors:
            print(f"  {label:{width}s} {'-':>9s} {'-':>8s} {'-':>11s} {'-':>12s}  {errors[0]}")
            continue
        ms = statistics.median(r["median_s"] for r in got) * 1e3
        ratios = sorted(e["median_s"] / r["median_s"] for e, r in zip(eager, got) if "median_s" in e)
        vs = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        spread = f"{ratios[0]:.2f}-{ratios[-1]:.2f}" if ratios else "-"
        faults = [r["faults"] for r in got if r["faults"] is not None]
        fl = f"{statistics.mean(faults):.0f}" if faults else "-"
        print(f"  {label:{width}s} {ms:9.3f} {vs:>8s} {spread:>11s} {fl:>12s}  ok")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
