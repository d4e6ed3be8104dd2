"""fastnn's side-by-side benchmark: y = act(x @ W^T + b), forward, forward+backward, or an MLP block.

    python benchmarks/fused_linear.py                       # the default set for the device here
    python benchmarks/fused_linear.py --quick               # a smoke run (seconds)
    python benchmarks/fused_linear.py --device cuda --shapes llama-7b decode --activation swiglu \
        --mode fwd fwd+bwd --out results.json --plot speedup.png

Every configuration of one case (shape, dtype, activation, mode) runs interleaved with the others,
round by round, so that machine noise hits all alike; each is first checked against a float64
reference with the numerics rule of ../shared/design.md (error at most 2x eager PyTorch's plus
2 eps of the largest magnitude), and a wrong result is reported as WRONG, never timed.

Configurations: fastnn on each backend usable here; eager PyTorch (act(F.linear(...))); torch.compile
(default mode, and mode="max-autotune" on CUDA); torch._addmm_activation (cuBLASLt epilogue, CUDA,
relu and gelu_tanh, forward); torch.ops.mkldnn._linear_pointwise (oneDNN post-op, CPU, forward);
and the bare GEMMs alone (x @ W^T forward; plus dY @ W and dY^T @ X backward): the limit a fused op
approaches; on CPUs, with backward, the bare GEMMs again with the weight gradients' dY^T (and the
MLP's dH^T) given as row-major copies made before timing ("dW lhs copied": torch's bfloat16 CPU GEMMs
run dY^T @ X far faster so, and fastnn's cpu backend makes that copy), and on CPUs the bare GEMMs
writing into outputs made once and kept ("outputs kept": no fresh pages, whose first touch faults;
the "/ GEMM" column stays relative to the plain bare-GEMM row, which allocates as eager does).
Per row: median time, TFLOP/s, effective GB/s (the bytes the op must move: inputs, outputs, and in
backward the gradients), speed-up vs eager and ratio to the
bare GEMM (each the median over rounds of that round's ratio, with the speed-up's interquartile
range), the activation memory held for backward (fwd+bwd and mlp modes), and peak memory (CUDA).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastnn
from fastnn import activations, backends
from fastnn.info import device_name

PRESETS = {
    # the CPU set of the foundation issue: (M, K, N) = (rows, in_features, out_features)
    "cpu": [(8192, 256, 1024), (4096, 1024, 4096), (256, 768, 3072)],
    "quick": [(256, 128, 384)],
    "bert-base": [(8192, 768, 3072), (8192, 3072, 768)],
    "gpt2": [(8192, 768, 3072)],
    "gpt2-xl": [(8192, 1600, 6400)],
    "llama-7b": [(4096, 4096, 11008), (4096, 11008, 4096)],
    "decode": [(1, 4096, 11008), (16, 4096, 11008), (64, 4096, 11008)],
    "square": [(8192, 8192, 8192)],
}
DEFAULT_CPU = ["cpu"]
DEFAULT_CUDA = ["bert-base", "gpt2-xl", "llama-7b", "decode", "square"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("fwd", "fwd+bwd", "mlp")

# oneDNN post-op names and scalars, for torch.ops.mkldnn._linear_pointwise
ONEDNN_ATTR = {
    "relu": ("relu", [], ""), "gelu": ("gelu", [], "none"), "gelu_tanh": ("gelu", [], "tanh"),
    "silu": ("swish", [], ""), "sigmoid": ("sigmoid", [], ""), "tanh": ("tanh", [], ""),
    "leaky_relu": ("leaky_relu", [activations.LEAKY_SLOPE], ""), "identity": ("none", [], ""),
}


@dataclass
class Case:
    m: int
    k: int
    n: int
    dtype: str
    activation: str
    mode: str

    @property
    def gated(self):
        return self.activation in activations.GATED

    def label(self):
        return f"{self.m}x{self.k}x{self.n} {self.dtype} {self.activation} {self.mode}"


@dataclass
class Row:
    case: dict
    config: str
    status: str  # "ok", "WRONG: ...", "n/a: ..."
    ms: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    speedup_vs_eager: Optional[float] = None  # median of the per-round ratios (paired_ratio)
    speedup_quartiles: list = field(default_factory=list)  # their lower and upper quartiles
    ratio_to_gemm: Optional[float] = None
    saved_mb: Optional[float] = None
    peak_mb: Optional[float] = None
    err: Optional[float] = None
    samples: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# inputs and configurations
# ---------------------------------------------------------------------------------------------
def make_inputs(case: Case, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = DTYPES[case.dtype]
    grad = case.mode != "fwd"

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_(grad)

    ws = 1 / math.sqrt(case.k)
    inp = {"x": t(case.m, case.k)}
    if case.gated:
        inp.update(wg=t(case.n, case.k, scale=ws), wu=t(case.n, case.k, scale=ws), bg=t(case.n, scale=0.5),
                   bu=t(case.n, scale=0.5))
    else:
        inp.update(w=t(case.n, case.k, scale=ws), b=t(case.n, scale=0.5))
    if case.mode == "mlp":
        inp.update(w2=t(case.k, case.n, scale=1 / math.sqrt(case.n)), b2=t(case.k, scale=0.5))
    return inp


def make_grad_out(case: Case, device):
    """The gradient fed to backward (seeded), or None for a forward-only case."""
    if case.mode == "fwd":
        return None
    cols = case.k if case.mode == "mlp" else case.n
    return torch.randn(case.m, cols, generator=torch.Generator().manual_seed(1)).to(device=device,
                                                                                   dtype=DTYPES[case.dtype])


def _first_layer(case, impl):
    """The fused layer of a case, as `impl` computes it: impl(x, w, b, name) or the gated form."""
    if case.gated:
        return lambda p, x: impl(x, p["wg"], p["wu"], p["bg"], p["bu"], case.activation)
    return lambda p, x: impl(x, p["w"], p["b"], case.activation)


def eager_layer(x, w, b, name):
    return activations.get(name).fn(F.linear(x, w, b))


def eager_glu(x, wg, wu, bg, bu, name):
    return activations.get_gated(name).fn(F.linear(x, wg, bg)) * F.linear(x, wu, bu)


def forward_fn(case: Case, layer_impl, glu_impl, second=None):
    """params -> output of the case's forward (layer, or MLP block)."""
    layer = _first_layer(case, glu_impl if case.gated else layer_impl)
    if case.mode != "mlp":
        return lambda p: layer(p, p["x"])
    second = second or (lambda h, w2, b2: F.linear(h, w2, b2))
    return lambda p: second(layer(p, p["x"]), p["w2"], p["b2"])


def with_backward(case: Case, fwd, inputs, grad_out):
    """A callable running the forward (and, unless mode is fwd, the backward) returning the
    tensors to check: (y,) or (y, *grads)."""
    if case.mode == "fwd":
        def run():
            with torch.no_grad():
                return (fwd(inputs),)
        return run
    leaves = [v for v in inputs.values() if v.requires_grad]

    def run():
        y = fwd(inputs)
        return (y, *torch.autograd.grad(y, leaves, grad_out))
    return run


def bare_gemm_fn(case: Case, inputs, grad_out, lhs_copied=False, outputs_kept=False):
    """The GEMMs alone: the work of the case with no bias, activation or saved tensors. With
    lhs_copied, the weight-gradient GEMMs' left factors (dY^T, and the MLP's dH^T) are row-major
    copies made once before timing instead of transposed views: the GEMM work in the layout the cpu
    backend gives torch's bfloat16 GEMMs (fastnn/backends/cpu.py: wgrad_from_copy), without the copies.
    With outputs_kept, each GEMM writes into an output made on the first call and kept: no
    allocation and no fresh pages in the timed calls, the floor under any implementation (on a CPU
    a fresh output of a few MiB can cost a page fault per 4 KiB on its first write)."""
    x = inputs["x"].detach()
    ws = [inputs[k].detach() for k in (("wg", "wu") if case.gated else ("w",))]
    w2 = inputs["w2"].detach() if case.mode == "mlp" else None
    dy = grad_out.detach() if grad_out is not None else None
    backward = case.mode != "fwd"
    dy_t = dh_t = None
    if backward and lhs_copied:
        dy_t = dy.t().contiguous()
        dh_t = (torch.mm(dy, w2) if w2 is not None else dy).t().contiguous()

    kept = []

    def run():
        made = 0  # GEMMs run so far in this call: the i-th writes into kept[i]

        def mm(a, b):
            nonlocal made
            if not outputs_kept:
                return torch.mm(a, b)
            if made == len(kept):
                kept.append(torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device))
            made += 1
            return torch.mm(a, b, out=kept[made - 1])

        with torch.no_grad():
            hs = [mm(x, w.t()) for w in ws]
            out = [mm(hs[0], w2.t())] if w2 is not None else hs
            if backward:
                dh = mm(dy, w2) if w2 is not None else dy
                if w2 is not None:
                    out.append(mm(dy.t() if dy_t is None else dy_t, hs[0]))
                for w in ws:
                    out.append(mm(dh, w))
                    out.append(mm(dh.t() if dh_t is None else dh_t, x))
            return tuple(out)
    return run


@dataclass
class Config:
    name: str
    run: Optional[Callable] = None
    unavailable: Optional[str] = None
    checked: bool = True  # the bare GEMM computes something else and is not checked
    compiled: bool = False  # a torch.compile row: its first run must compile a graph


def build_configs(case: Case, inputs, grad_out, device, fastnn_backends, compile_modes, baselines):
    cfgs = []
    for be in fastnn_backends:
        act = activations.get_gated(case.activation) if case.gated else activations.get(case.activation)
        probe_w = [inputs["wg"], inputs["wu"]] if case.gated else [inputs["w"]]
        reason = backends.BACKENDS[be].unsupported_reason(
            "linear_glu" if case.gated else "linear_act", inputs["x"], probe_w, act) if be in backends.BACKENDS \
            else "not in this build"
        if reason:
            cfgs.append(Config(f"fastnn[{be}]", unavailable=reason))
            continue
        layer = (lambda be: lambda x, w, b, name: fastnn.linear_act(x, w, b, name, backend=be))(be)
        glu = (lambda be: lambda x, wg, wu, bg, bu, name: fastnn.linear_glu(x, wg, wu, bg, bu, name, backend=be))(be)
        second = (lambda be: lambda h, w2, b2: fastnn.linear_act(h, w2, b2, "identity", backend=be))(be)
        fwd = forward_fn(case, layer, glu, second)
        cfgs.append(Config(f"fastnn[{be}]", with_backward(case, fwd, inputs, grad_out)))
        if case.mode == "mlp":  # the block as one call, at each memory level (the saved MB column)
            for level in fastnn.functional.RECOMPUTE_LEVELS:
                block = (lambda be, level: lambda p: fastnn.mlp(
                    p["x"], p["wg"] if case.gated else p["w"], p["bg"] if case.gated else p["b"], p["w2"], p["b2"],
                    case.activation, up_weight=p.get("wu"), up_bias=p.get("bu"), recompute=level, backend=be))(be, level)
                cfgs.append(Config(f"fastnn.mlp[{be}] {level}", with_backward(case, block, inputs, grad_out)))

    eager = forward_fn(case, eager_layer, eager_glu)
    cfgs.append(Config("eager", with_backward(case, eager, inputs, grad_out)))
    if compile_modes:
        # every case's forward is the same code object to dynamo, which compiles one code object at
        # most recompile_limit (8) times and then runs it eagerly without a word: the default set's
        # ninth case on was timing eager PyTorch in its compile row. Each case compiles afresh.
        torch._dynamo.reset()
    for mode in compile_modes:
        name = "compile" if mode == "default" else f"compile[{mode}]"
        compiled = torch.compile(forward_fn(case, eager_layer, eager_glu), mode=None if mode == "default" else mode,
                                 dynamic=False)
        cfgs.append(Config(name, with_backward(case, compiled, inputs, grad_out), compiled=True))

    if "addmm_activation" in baselines:
        name = "torch._addmm_activation"
        if device.type != "cuda":
            cfgs.append(Config(name, unavailable="CUDA only"))
        elif case.activation not in ("relu", "gelu_tanh") or case.gated:
            cfgs.append(Config(name, unavailable="relu and gelu_tanh only"))
        else:
            use_gelu = case.activation == "gelu_tanh"
            impl = lambda x, w, b, _name: torch._addmm_activation(b, x, w.t(), use_gelu=use_gelu)  # noqa: E731
            cfgs.append(Config(name, with_backward(case, forward_fn(case, impl, None), inputs, grad_out)
                               if case.mode == "fwd" else None,
                               unavailable=None if case.mode == "fwd" else "forward only (no autograd formula)"))
    if "onednn" in baselines:
        name = "onednn post-op"
        if device.type != "cpu":
            cfgs.append(Config(name, unavailable="CPU only"))
        elif case.gated or case.activation not in ONEDNN_ATTR or case.mode != "fwd":
            cfgs.append(Config(name, unavailable="forward of a non-gated oneDNN post-op only"))
        else:
            attr, scalars, algo = ONEDNN_ATTR[case.activation]
            impl = lambda x, w, b, _n: torch.ops.mkldnn._linear_pointwise(x, w, b, attr, scalars, algo)  # noqa: E731
            cfgs.append(Config(name, with_backward(case, forward_fn(case, impl, None), inputs, grad_out)))
    cfgs.append(Config("bare GEMM", bare_gemm_fn(case, inputs, grad_out), checked=False))
    if device.type == "cpu" and case.mode != "fwd":
        cfgs.append(Config("bare GEMM, dW lhs copied", bare_gemm_fn(case, inputs, grad_out, lhs_copied=True),
                           checked=False))
    if device.type == "cpu":  # (CUDA: torch's caching allocator keeps memory already)
        cfgs.append(Config("bare GEMM, outputs kept", bare_gemm_fn(case, inputs, grad_out, outputs_kept=True),
                           checked=False))
    return cfgs


# ---------------------------------------------------------------------------------------------
# checking, memory, timing
# ---------------------------------------------------------------------------------------------
def reference(case: Case, inputs, grad_out):
    ref_inputs = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    g = None if grad_out is None else grad_out.double()
    return with_backward(case, forward_fn(case, eager_layer, eager_glu), ref_inputs, g)()


def max_errors(outs, ref):
    return [(o.detach().double() - r).abs().max().item() if r.numel() else 0.0 for o, r in zip(outs, ref)]


def check(outs, ref, eager_errs, dtype):
    """None when within the rule, else a description of the worst violation."""
    eps = torch.finfo(DTYPES[dtype]).eps
    for i, (o, r, e_eager) in enumerate(zip(outs, ref, eager_errs)):
        if o.shape != r.shape:
            return f"output {i} has shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        if r.numel() == 0:
            continue
        err = (o.detach().double() - r).abs().max().item()
        scale = r.abs().max().item()
        if not err <= 2 * e_eager + 2 * eps * scale:
            return f"output {i}: error {err:.3g} > 2 x eager's {e_eager:.3g} + {2 * eps * scale:.3g}"
    return None


def saved_bytes(cfg: Config, inputs) -> Optional[int]:
    """Bytes of the tensors autograd keeps for backward beyond the inputs themselves."""
    input_storages = {v.untyped_storage().data_ptr() for v in inputs.values()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in input_storages and st.device.type != "meta":
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cfg.run()
    return sum(seen.values())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device, inner):
    """Seconds per call of fn, over `inner` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def peak_mb(fn, device) -> Optional[float]:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def flops(case: Case) -> float:
    gemms = 2 if case.gated else 1
    if case.mode == "mlp":
        gemms += 1
    per = 2 * case.m * case.k * case.n
    return per * gemms * (1 if case.mode == "fwd" else 3)


def min_bytes(case: Case) -> float:
    """Bytes the op cannot avoid moving: inputs and outputs (and gradients in backward)."""
    s = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    m, k, n = case.m, case.k, case.n
    w = (2 if case.gated else 1) * (n * k + n)
    elems = m * k + w + m * n
    if case.mode == "mlp":
        elems += (k * n + k) + m * k - m * n  # second layer's weight; output is (m, k)
    if case.mode != "fwd":
        elems *= 2  # read the upstream gradient / write every input's gradient, about once more
    return elems * s


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def run_case(case: Case, device, args, log) -> list[Row]:
    inputs = make_inputs(case, device)
    grad_out = make_grad_out(case, device)
    cfgs = build_configs(case, inputs, grad_out, device, args.backends, args.compile_modes, args.baselines)
    ref = reference(case, inputs, grad_out)
    eager_cfg = next(c for c in cfgs if c.name == "eager")
    eager_errs = max_errors(eager_cfg.run(), ref)
    rows, live = [], []
    for cfg in cfgs:
        outs = None
        row = Row(case=asdict(case), config=cfg.name, status="ok")
        rows.append(row)
        if cfg.unavailable:
            row.status = f"n/a: {cfg.unavailable}"
            continue
        try:
            graphs = compiled_graphs() if cfg.compiled else None
            outs = cfg.run()  # also the warm-up (and torch.compile's compilation)
            sync(device)
            if cfg.compiled and compiled_graphs() == graphs:
                row.status = "failed: torch.compile compiled no graph (dynamo ran the function eagerly)"
                continue
            if cfg.checked:
                problem = check(outs, ref, eager_errs, case.dtype)
                row.err = max(max_errors(outs, ref))
                if problem:
                    row.status = f"WRONG (outside the error rule): {problem}"
                    continue
            if case.mode != "fwd" and cfg.checked:  # (not the bare GEMMs)
                row.saved_mb = saved_bytes(cfg, inputs) / 2**20
            row.peak_mb = peak_mb(cfg.run, device)
            live.append((cfg, row))
        except Exception as exc:  # noqa: BLE001 -- a failing config is reported, not fatal
            row.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        del outs

    def progress(r):
        if sys.stderr.isatty():
            log(f"\r  timing: round {r + 1}/{args.repeats}", end="")

    timed = interleaved_samples([cfg.run for cfg, _ in live], device, args.repeats, args.min_sample_s, progress)
    for (_, row), times in zip(live, timed):
        row.samples.extend(times)
    if sys.stderr.isatty():
        log("\r" + " " * 40 + "\r", end="")
    fl, by = flops(case), min_bytes(case)
    for cfg, row in live:
        med = statistics.median(row.samples)
        row.ms, row.tflops, row.gbps = med * 1e3, fl / med / 1e12, by / med / 1e9
    samples = {row.config: row.samples for row in rows if row.ms}
    for row in rows:
        if row.ms:
            if "eager" in samples:
                row.speedup_vs_eager, *row.speedup_quartiles = paired_ratio(samples["eager"], row.samples)
            if "bare GEMM" in samples:
                row.ratio_to_gemm = paired_ratio(row.samples, samples["bare GEMM"])[0]
    return rows


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process (since its last reset)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def interleaved_samples(fns, device, rounds, min_sample_s, progress=None):
    """`rounds` samples of each function's seconds per call: calibrated to enough calls per sample
    (up to 1000) to last min_sample_s, and interleaved round by round, each round starting one
    function later, so that none always runs right after the same one. progress(r) after round r."""
    inner = [max(1, min(1000, int(min_sample_s / max(time_once(fn, device, 1), 1e-7)))) for fn in fns]
    samples = [[] for _ in fns]
    for r in range(rounds if fns else 0):
        start = r % len(fns)
        for i in [*range(start, len(fns)), *range(start)]:
            samples[i].append(time_once(fns[i], device, inner[i]))
        if progress is not None:
            progress(r)
    return samples


def paired_ratio(numerators, denominators):
    """(median, lower quartile, upper quartile) of the per-round ratios numerator / denominator.

    Two configurations timed in the same round saw the same machine state, so the ratio of each
    round's pair cancels slow drift (another tenant, clock changes) that a ratio of two separate
    medians keeps; the quartiles show how much the rounds disagree."""
    ratios = sorted(a / b for a, b in zip(numerators, denominators))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), q1, q3


def _fmt(v, spec, suffix=""):
    width = int(spec.split(".")[0])
    return ("-" if v is None else format(v, spec).strip() + suffix).rjust(width)


def print_table(rows, out=sys.stdout):
    if not rows:
        return
    c = rows[0]["case"] if isinstance(rows[0], dict) else rows[0].case
    print(f"\n{c['m']}x{c['k']}x{c['n']} (MxKxN) {c['dtype']} {c['activation']} {c['mode']}", file=out)
    print(f"  {'config':26s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} {'vs eager':>8s} {'IQR':>11s} {'/ GEMM':>7s} "
          f"{'saved MB':>9s} {'KiB/tok':>8s} {'peak MB':>8s}  status", file=out)
    for r in rows:
        r = asdict(r) if not isinstance(r, dict) else r
        per_token = None if r['saved_mb'] is None else r['saved_mb'] * 1024 / max(c['m'], 1)  # a token is a row of x
        quartiles = r.get('speedup_quartiles') or []
        iqr = f"{quartiles[0]:.2f}-{quartiles[1]:.2f}" if len(quartiles) == 2 else "-"
        print(f"  {r['config']:26s} {_fmt(r['ms'], '9.3f')} {_fmt(r['tflops'], '8.3f')} {_fmt(r['gbps'], '7.1f')} "
              f"{_fmt(r['speedup_vs_eager'], '8.2f', 'x')} {iqr:>11s} {_fmt(r['ratio_to_gemm'], '7.2f', 'x')} "
              f"{_fmt(r['saved_mb'], '9.1f')} {_fmt(per_token, '8.2f')} {_fmt(r['peak_mb'], '8.1f')}  {r['status']}",
              file=out)


def environment(device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    from fastnn import _native
    build = dict(_native._C.build_info()) if _native._C is not None else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "device": device_name(device), "device_type": device.type,
        "fastnn": fastnn.__version__, "git_commit": commit, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": triton_version, "python": sys.version.split()[0],
        "cpu_threads": torch.get_num_threads(), "fastnn_cpu_build": build,
    }


def write_outputs(args, env, rows):
    flat = [asdict(r) for r in rows]
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".csv":
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                keys = ["config", "status", "ms", "tflops", "gbps", "speedup_vs_eager", "ratio_to_gemm",
                        "saved_mb", "peak_mb", "err"]
                w.writerow(["m", "k", "n", "dtype", "activation", "mode", *keys, *env.keys()])
                for r in flat:
                    c = r["case"]
                    w.writerow([c["m"], c["k"], c["n"], c["dtype"], c["activation"], c["mode"],
                                *[r[k] for k in keys], *env.values()])
        else:
            path.write_text(json.dumps({"environment": env, "rows": flat}, indent=1))
        print(f"wrote {path}")
    if args.plot:
        plot(flat, env, args.plot)


def plot(rows, env, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return
    cases = []
    for r in rows:
        c = r["case"]
        label = f"{c['m']}x{c['k']}x{c['n']}\n{c['dtype']} {c['activation']}\n{c['mode']}"
        if label not in cases:
            cases.append(label)
    configs = [c for c in dict.fromkeys(r["config"] for r in rows) if c != "eager"]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases)), 5))
    width = 0.8 / max(1, len(configs))
    for i, cfg in enumerate(configs):
        vals = []
        for label in cases:
            match = [r for r in rows if r["config"] == cfg and
                     f"{r['case']['m']}x{r['case']['k']}x{r['case']['n']}\n{r['case']['dtype']} "
                     f"{r['case']['activation']}\n{r['case']['mode']}" == label]
            vals.append(match[0]["speedup_vs_eager"] or 0 if match else 0)
        if not any(vals):
            continue  # a baseline that does not apply here (n/a, or outside the error rule everywhere)
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=cfg)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, fontsize=7)
    ax.set_ylabel("speed-up vs eager PyTorch (higher is better)")
    ax.set_title(f"fastnn {env['fastnn']} on {env['device']} (torch {env['torch']}, {env['date']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_shapes(items):
    shapes = []
    for item in items:
        if item in PRESETS:
            shapes += PRESETS[item]
            continue
        try:
            m, k, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is neither MxKxN nor a preset ({', '.join(PRESETS)})")
        shapes.append((m, k, n))
    return shapes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES))
    p.add_argument("--activation", nargs="+", default=None,
                   help=f"any of {', '.join(activations.ACTIVATIONS)} or gated {', '.join(activations.GATED)}")
    p.add_argument("--shapes", nargs="+", help=f"MxKxN (rows x in x out) or presets: {', '.join(PRESETS)}")
    p.add_argument("--mode", nargs="+", choices=MODES)
    p.add_argument("--backends", nargs="+", help="fastnn backends to run (default: every one usable here)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--compile-modes", nargs="+", choices=["default", "max-autotune"],
                   help="torch.compile modes to compare (default: default, and max-autotune on CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration")
    p.add_argument("--min-sample-ms", type=float, default=None, help="least time per timed sample")
    p.add_argument("--out", help="write rows to results.json or .csv")
    p.add_argument("--plot", help="write a PNG of speed-up by case")
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here")
    if args.quick:
        args.shapes = args.shapes or ["quick"]
        args.dtype = args.dtype or ["float32"]
        args.activation = args.activation or ["gelu"]
        args.mode = args.mode or ["fwd", "fwd+bwd"]
        args.repeats = args.repeats or 3
        args.min_sample_ms = args.min_sample_ms or 1.0
    args.shapes = parse_shapes(args.shapes or (DEFAULT_CUDA if cuda else DEFAULT_CPU))
    args.skipped_dtypes = []
    if not args.dtype and not cuda:
        # eager's 16-bit GEMM on a CPU without native 16-bit kernels takes minutes per call at these
        # shapes; fastnn's does not (it multiplies in float32 there), but eager is the yardstick
        from fastnn.backends.cpu import torch_gemm_is_slow
        args.skipped_dtypes = [d for d in ("bfloat16",) if torch_gemm_is_slow(DTYPES[d])]
    args.dtype = args.dtype or (["bfloat16"] if cuda else
                                [d for d in ("float32", "bfloat16") if d not in args.skipped_dtypes])
    args.activation = args.activation or ["gelu"]
    for a in args.activation:
        if a not in activations.ACTIVATIONS and a not in activations.GATED:
            raise SystemExit(f"--activation: unknown {a!r}")
    args.mode = args.mode or ["fwd", "fwd+bwd"]
    args.repeats = args.repeats or 15
    # (CPU: several calls per sample where one is short, which evens out this kind of machine's jitter)
    args.min_sample_s = (args.min_sample_ms or (20.0 if cuda else 50.0)) / 1e3
    # (Triton's interpreter on CPU tensors is a test tool, not something to time: ask for it by name)
    default = ("cuda", "triton") if cuda else ("cpu",)
    args.backends = args.backends or [b for b in default if _usable(b, args.device)]
    args.compile_modes = [] if args.no_compile else (
        args.compile_modes or (["default", "max-autotune"] if cuda else ["default"]))
    args.baselines = ["addmm_activation", "onednn"]
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def _usable(name, device):
    be = backends.BACKENDS.get(name)
    if be is None:
        return False
    probe = torch.empty(2, 8, device=device)
    return be.unsupported_reason("linear_act", probe, [torch.empty(8, 8, device=device)],
                                 activations.get("gelu")) is None


def main(argv=None):
    args = parse_args(argv)
    env = environment(args.device)
    log = lambda *a, **k: print(*a, **k, file=sys.stderr, flush=True)  # noqa: E731
    print(f"fastnn {env['fastnn']} ({env['git_commit']}) on {env['device']}; torch {env['torch']}, "
          f"triton {env['triton']}; {env['date']}")
    print(f"fastnn backends: {', '.join(args.backends) or 'none usable here'}; "
          f"times are medians of {args.repeats} interleaved rounds; ratios are medians of the rounds' ratios")
    for d in args.skipped_dtypes:
        print(f"{d} left out of the default set: torch has no native {d} GEMM for this CPU (oneDNN needs "
              f"AVX512-BF16 or AMX) and its fallback runs tens of times slower than float32, so eager would "
              f"take minutes per call; --dtype {d} with smaller --shapes measures it")
    cases = [Case(m, k, n, dt, act, mode) for (m, k, n) in args.shapes for dt in args.dtype
             for act in args.activation for mode in args.mode]
    all_rows = []
    for i, case in enumerate(cases):
        log(f"[{i + 1}/{len(cases)}] {case.label()}")
        rows = run_case(case, args.device, args, log)
        print_table(rows)
        sys.stdout.flush()
        all_rows += rows
    write_outputs(args, env, all_rows)
    wrong = [r for r in all_rows if r.status.startswith("WRONG") or r.status.startswith("failed")]
    if wrong:
        print(f"\n{len(wrong)} configuration(s) WRONG or failed:")
        for r in wrong:
            print(f"  {r.config} on {Case(**r.case).label()}: {r.status}")
    return 1 if any(r.config.startswith("fastnn") for r in wrong) else 0


if __name__ == "__main__":
    sys.exit(main())
