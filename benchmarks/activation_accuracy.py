"""fastnn's CPU activations against PyTorch's: error in ulp over every float32 in a range (not a
sample), and time per element of the fused passes beside PyTorch's own kernels.

    python benchmarks/activation_accuracy.py                      # gelu, gelu_tanh, silu on |z| in [2^-16, 16]
    python benchmarks/activation_accuracy.py --activation gelu --lo 1e-3 --hi 8
    python benchmarks/activation_accuracy.py --dtype bfloat16     # the 16-bit kernels' results

Accuracy: value and derivative of every float32 z with lo <= |z| <= hi (both signs), fastnn's C++
functors (the instantiations the CPU kernels use) and PyTorch's float32 ops, each against float64,
in units of the float32 spacing at the reference value (ulp; for the derivative, whose terms cancel
near its zeros, the spacing at max(|reference|, 1), as tests/test_activations.py does). Values whose
reference is below float32's normal range (the far negative tail: both flush or lose digits there)
are left out of the value statistics and counted.
With --dtype bfloat16 or float16: what the 16-bit kernels store, fastnn's float math for 16-bit
results (csrc/include/fastnn/activations.h, Accuracy::kHalf) on every float32 z (the kernels add the
bias in float) rounded once to the dtype, against PyTorch's op on z rounded to the dtype (it takes
16-bit inputs), each against float64 at its own input, in units of the dtype's spacing.
Speed: the CPU backend's forward pass (bias + activation) and backward pass (dY * act'(z) and the
bias gradient) on (2048, 3072) and (256, 3072) tensors of the dtype (float32: the second fits the caches),
against PyTorch's activation, and its backward plus the column sum that eager autograd runs for
the bias gradient; all threads, interleaved rounds, medians of times and of PyTorch's time over
fastnn's per round.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
import torch.nn.functional as F

import fastnn
from fastnn import _native, activations
from fused_linear import interleaved_samples, paired_ratio  # the benchmark's sampling and paired ratios

_K0, _K1 = math.sqrt(2 / math.pi), 0.044715
# float64 references that keep their relative accuracy in the far negative tail
REFERENCE = {
    "gelu": lambda z: 0.5 * z * torch.erfc(-z / math.sqrt(2)),
    "gelu_tanh": lambda z: z * torch.sigmoid(2 * _K0 * (z + _K1 * z**3)),
}
TORCH_BACKWARD = {
    "gelu": lambda dy, z: torch.ops.aten.gelu_backward(dy, z),
    "gelu_tanh": lambda dy, z: torch.ops.aten.gelu_backward(dy, z, approximate="tanh"),
    "silu": lambda dy, z: torch.ops.aten.silu_backward(dy, z),
    "sigmoid": lambda dy, z: torch.ops.aten.sigmoid_backward(dy, torch.sigmoid(z)),
    "tanh": lambda dy, z: torch.ops.aten.tanh_backward(dy, torch.tanh(z)),
}
CHUNK = 1 << 22


def float_range(lo: float, hi: float):
    """Every float32 z with lo <= |z| <= hi, both signs, in chunks."""
    a = torch.tensor([lo], dtype=torch.float32).view(torch.int32).item()
    b = torch.tensor([hi], dtype=torch.float32).view(torch.int32).item()
    for start in range(a, b + 1, CHUNK):
        bits = torch.arange(start, min(start + CHUNK, b + 1), dtype=torch.int32)
        z = bits.view(torch.float32)
        yield torch.cat([z, -z])


def ulp_of(ref: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The spacing of `dtype` at |ref| (float64 in, float64 out)."""
    mag = ref.abs().clamp(min=torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) + math.log2(torch.finfo(dtype).eps))


def accuracy(name: str, lo: float, hi: float, dtype=torch.float32):
    act = activations.get(name)
    C = _native.cpu_module()
    ref_fn = REFERENCE.get(name, act.fn)

    def reference(zd):
        """float64 value and derivative at zd, the dtype's spacing at each, and where the value is normal."""
        ref, dref = ref_fn(zd), act.grad(zd)
        return (ref, dref, ulp_of(ref, dtype), ulp_of(dref.abs().clamp(min=1.0), dtype),
                ref.abs() >= torch.finfo(dtype).tiny)

    worst = {k: 0.0 for k in ("fastnn value", "torch value", "fastnn derivative", "torch derivative")}
    where = {}
    total = {k: 0.0 for k in worst}
    within = {k: 0 for k in worst}  # points within 1 ulp
    counts = {k: 0 for k in worst}
    count = subnormal = 0
    for z in float_range(lo, hi):
        out, dout = torch.empty_like(z), torch.empty_like(z)
        C.cpu_eval_activation(_native.DTYPE_CODES[dtype], act.code, z.numel(), z.data_ptr(), out.data_ptr(),
                              dout.data_ptr())
        out, dout = out.to(dtype), dout.to(dtype)
        zt = z.to(dtype)  # PyTorch's input: z rounded to the dtype
        ref, dref, u, du, normal = reference(z.double())
        # (float32: PyTorch's input is z itself, and so is its reference)
        ref_t, dref_t, u_t, du_t, normal_t = (ref, dref, u, du, normal) if zt is z else reference(zt.double())
        theirs = act.fn(zt).double()
        dtheirs = (TORCH_BACKWARD[name](torch.ones_like(zt), zt) if name in TORCH_BACKWARD else act.grad(zt)).double()
        subnormal += int((~normal).sum())
        everywhere = torch.ones_like(normal)
        for key, got, r, scale, keep in (("fastnn value", out, ref, u, normal),
                                         ("torch value", theirs, ref_t, u_t, normal_t),
                                         ("fastnn derivative", dout, dref, du, everywhere),
                                         ("torch derivative", dtheirs, dref_t, du_t, everywhere)):
            err = ((got.double() - r).abs() / scale)[keep]
            zk = z[keep]
            if err.numel():
                m, i = err.max(dim=0)
                if m.item() > worst[key]:
                    worst[key], where[key] = m.item(), zk[i].item()
            total[key] += err.sum().item()
            within[key] += int((err <= 1.0).sum())
            counts[key] += err.numel()
        count += z.numel()
    stats = {k: (worst[k], total[k] / max(counts[k], 1), within[k] / max(counts[k], 1), where.get(k)) for k in worst}
    return stats, count, subnormal


def speed(name: str, rows: int, cols: int, dtype=torch.float32):
    """fastnn's forward and backward passes and PyTorch's, interleaved: their median times in ms
    (ours_fwd, torch_fwd, ours_bwd, torch_bwd) and the medians of PyTorch's time over fastnn's per
    round, forward and backward."""
    act = activations.get(name)
    C = _native.cpu_module()
    code = _native.DTYPE_CODES[dtype]
    threads = _native.num_threads()
    z, dy = torch.randn(rows, cols, dtype=dtype), torch.randn(rows, cols, dtype=dtype)
    y, dz, db = torch.empty_like(z), torch.empty_like(z), torch.empty(cols)
    backward = TORCH_BACKWARD.get(name, lambda dy, z: dy * act.grad(z))
    times = interleaved_samples([
        lambda: C.cpu_bias_act_forward(code, act.code, rows, cols, z.data_ptr(), 0, y.data_ptr(), 0, threads),
        lambda: act.fn(z),
        lambda: C.cpu_act_backward(code, act.code, rows, cols, dy.data_ptr(), z.data_ptr(), 0, dz.data_ptr(),
                                   db.data_ptr(), threads),
        lambda: (backward(dy, z), dy.sum(0)),
    ], torch.device("cpu"), rounds=15, min_sample_s=5e-3)
    ms = [statistics.median(t) * 1e3 for t in times]
    return (*ms, paired_ratio(times[1], times[0])[0], paired_ratio(times[3], times[2])[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--activation", nargs="+", default=["gelu", "gelu_tanh", "silu"])
    p.add_argument("--lo", type=float, default=2.0**-16)
    p.add_argument("--hi", type=float, default=16.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--speed-shapes", nargs="+", default=["2048x3072", "256x3072"],
                   help="rows x cols of the timed passes (256x3072 float32 stays in the caches)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    from fastnn.info import device_name

    print(f"fastnn {fastnn.__version__} on {device_name(torch.device('cpu'))}, CPU kernels "
          f"{_native._C.build_info()['cpu_isa_active']}; torch {torch.__version__}")
    for name in args.activation:
        stats, n, subnormal = accuracy(name, args.lo, args.hi, dtype)
        print(f"\n{name}: every float32 with {args.lo:g} <= |z| <= {args.hi:g} ({n:,} values; {subnormal:,} with a "
              f"reference value below {args.dtype}'s normal range left out of the value rows); error in ulp of "
              f"{args.dtype}")
        print(f"  {'':18s} {'max':>8s} {'mean':>7s} {'<= 1 ulp':>9s}  worst at z")
        for key, (worst, mean, ok, z) in stats.items():
            print(f"  {key:18s} {worst:8.3f} {mean:7.3f} {100 * ok:8.3f}%  {z}")
        for shape in ([] if args.no_speed else args.speed_shapes):
            rows, cols = (int(v) for v in shape.split("x"))
            of, tf, ob, tb, rf, rb = speed(name, rows, cols, dtype)
            print(f"  speed on {rows}x{cols} {args.dtype}: forward {of:.3f} ms (PyTorch {tf:.3f}, {rf:.2f}x); "
                  f"backward + bias gradient {ob:.3f} ms (PyTorch {tb:.3f}, {rb:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
