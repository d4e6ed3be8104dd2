"""Tier 3 for Triton: compile, ahead of time and with no GPU, every Triton kernel variant the
backend launches, in every autotune config its pruner keeps, for one GPU target.

    python tests/triton_aot.py --arch 90 [--json report.json] [--quick]

How: a stand-in Triton driver whose target is GPUTarget("cuda", ARCH, 32) (sm_90 compiles as
sm_90a), the backend's real launchers (fastnn.triton_kernels) called on small CPU tensors with a
`wrap` that turns each launch into JITFunction.warmup (the JIT's own argument specialisation:
integers equal to 1, 16-byte alignment), the autotuner's own pruning with the target's shared
memory limit and SM count; registers and spills from the log of the compile's own `ptxas -v`
(the Triton wheel's ptxas run again for a kernel that came from Triton's cache).
Fails (exit 1) on a compile error, on shared memory over the target's limit, or on a pipelining
hazard in the TTGIR (short_operand_buffer); spills are reported. Needs TRITON_INTERPRET unset (the
script clears it).
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
# wgrad runs its kernel on a GPU only when asked (linear_act.wgrad_kernel_on_gpu): it is compiled here all the same
os.environ["FASTNN_TRITON_WGRAD"] = "kernel"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

# per-block opt-in shared memory and SM counts of the GPUs these targets stand for (H100/H200, A100)
TARGETS = {90: dict(smem=232448, sms=132), 80: dict(smem=166912, sms=108)}


class StandInDriver(DriverBase):
    """Enough of a CUDA driver for the JIT to compile (never to launch) for `target`."""

    def __init__(self, target):
        self.target = target

    @staticmethod
    def is_active():
        return False

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one compile cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver cannot run kernels")

    def map_python_to_cpp_type(self, ty):
        return ty


def parse_ptxas_log(text):
    """(registers, spill store bytes, spill load bytes) from ptxas -v's log; None without one."""
    regs = re.search(r"Used (\d+) registers", text)
    if regs is None:
        return None
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return int(regs.group(1)), int(spills.group(1)) if spills else -1, int(spills.group(2)) if spills else -1


def ptxas_usage(ptx, arch):
    """(registers, spill store bytes, spill load bytes) from the Triton wheel's ptxas -v, for a
    kernel whose compile left no log (it came from Triton's cache)."""
    import triton.backends.nvidia as nvidia

    bin_dir = os.path.join(os.path.dirname(nvidia.__file__), "bin")
    # the wheel ships two: the PTX Triton writes for a target may need the newer one
    candidates = [os.environ.get("TRITON_PTXAS_PATH"), os.path.join(bin_dir, "ptxas-blackwell"),
                  os.path.join(bin_dir, "ptxas")]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in [c for c in candidates if c and os.path.exists(c)]:
            out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", src, "-o",
                                  os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
            if out.returncode == 0:
                break
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas -v failed: {text.strip()[-300:]}")
    return parse_ptxas_log(text) or (-1, -1, -1)


def short_operand_buffer(ttgir):
    """Why a kernel's asynchronous wgmma may read a shared-memory tile that the pipeline overwrites,
    or None. Where both operands of the wgmma come from shared memory, each pipelined buffer needs a
    slot per stage; Triton gave one slot fewer to a tile that the loop also loads into registers
    (the wgrad kernel summing dY for db: wrong dW on an H200, see linear_act.wgrad), so the copy of a
    later tile could land while the dot still read it. (A wgmma whose left operand is in registers
    reads only the right one's buffer; its other buffers are read synchronously.)"""
    dots = [line for line in ttgir.splitlines() if "warp_group_dot " in line and "isAsync = true" in line]
    if not dots or any("#ttg.dot_op<{opIdx = 0" in line for line in dots):
        return None
    slots = [int(n) for n in re.findall(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x", ttgir)]
    if slots and min(slots) < max(slots):
        return f"pipelined buffers of an asynchronous wgmma with {min(slots)} and {max(slots)} slots: {slots}"
    return None


class Compiler:
    """The `wrap` given to the launchers: each launch becomes warmups of the configs it would run."""

    def __init__(self, arch):
        self.arch = arch
        self.limit = TARGETS[arch]["smem"]
        self.rows = {}
        self.failures = []
        self.variant = ""

    def __call__(self, kernel):
        compiler = self

        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: compiler.compile(kernel, args, kwargs)

        return Launch()

    def compile(self, kernel, args, kwargs):
        if isinstance(kernel, Autotuner):
            named = dict(zip(kernel.arg_names, args))
            configs = kernel.configs
            if kernel.early_config_prune:  # as the autotuner calls it: positional args named, kwargs as given
                configs = kernel.early_config_prune(configs, named, **kwargs)
            runs = [(kernel.fn, {**kwargs, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})
                    for c in configs]
        else:
            runs = [(kernel, kwargs)]
        for fn, kw in runs:
            self.warm(fn, args, kw)

    def warm(self, fn, args, kw):
        name = fn.__name__ if hasattr(fn, "__name__") else fn.fn.__name__
        constants = {k: (str(v) if not isinstance(v, (int, float, bool)) or isinstance(v, bool) else v)
                     for k, v in kw.items()}
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # Triton prints its own ptxas -v log (dump_ptxas_log)
                compiled = fn.warmup(*args, grid=(1,), **kw)
        except Exception as exc:  # noqa: BLE001 -- every compile error is a finding
            msg = str(exc).strip().splitlines()
            self.failures.append(dict(kernel=name, variant=self.variant, error=" | ".join(msg[-3:])[:600],
                                      **constants))
            return
        key = (name, compiled.hash if hasattr(compiled, "hash") else id(compiled))
        if key in self.rows:
            self.rows[key]["variants"].add(self.variant)
            return
        shared = compiled.metadata.shared
        hazard = short_operand_buffer(compiled.asm.get("ttgir", ""))
        if hazard:
            self.failures.append(dict(kernel=name, variant=self.variant, error=hazard, **constants))
        try:
            regs, spill_st, spill_ld = parse_ptxas_log(log.getvalue()) or ptxas_usage(compiled.asm["ptx"], self.arch)
        except RuntimeError as exc:
            self.failures.append(dict(kernel=name, variant=self.variant, error=str(exc), **constants))
            regs = spill_st = spill_ld = -1
        row = dict(kernel=name, shared=shared, regs=regs, spill_stores=spill_st, spill_loads=spill_ld,
                   variants={self.variant}, **constants)
        self.rows[key] = row
        if shared > self.limit:
            self.failures.append(dict(kernel=name, variant=self.variant,
                                      error=f"shared memory {shared} B over the limit {self.limit} B", **constants))


def run(arch, quick=False):
    driver.set_active(StandInDriver(GPUTarget("cuda", arch, 32)))
    triton.knobs.nvidia.dump_ptxas_log = True  # registers and spills from the compile's own ptxas run
    from fastnn.triton_kernels import common
    from fastnn.triton_kernels import linear_act as K
    from fastnn.triton_kernels import linear_glu as G

    # the launchers see the target's GPU (its capability, SMs and shared memory) in CPU tensors
    target = {"capability": lambda device: (arch // 10, arch % 10),
              "num_sms": lambda device: TARGETS[arch]["sms"],
              "shared_memory_limit": lambda device: TARGETS[arch]["smem"]}
    for module in (common, K, G):  # the launchers import these names, so each module's binding is replaced
        for name, fake in target.items():
            if hasattr(module, name):
                setattr(module, name, fake)
    comp = Compiler(arch)
    dtypes = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32": (torch.float32, False),
              "fp32-tf32": (torch.float32, True)}
    acts = {"identity": (0, 0), "relu": (1, 1), "gelu": (2, 2), "gelu_tanh": (3, 2), "silu": (4, 2),
            "sigmoid": (5, 2), "tanh": (6, 2), "leaky_relu": (7, 1), "squared_relu": (8, 3),
            "quick_gelu": (9, 2)}
    # one of each kind of saved tensor / epilogue (squared_relu: D applied through a threshold)
    classes = ["identity", "relu", "leaky_relu", "gelu", "squared_relu"]
    shapes = {"train": (256, 768, 1024), "decode": (1, 4096, 1024), "odd": (33, 1000, 1000)}
    if quick:  # what CI compiles: each kernel, in 16-bit and in float32 (TF32, the widest tiles)
        dtypes = {"bf16": dtypes["bf16"], "fp32-tf32": dtypes["fp32-tf32"]}
        acts = {a: acts[a] for a in ("relu", "gelu", "squared_relu")}  # (squared_relu: its backward, bf16)
        classes = list(acts)
        shapes = {"train": shapes["train"], "decode": shapes["decode"]}
    for dname, (dtype, tf32) in dtypes.items():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for act_name, (code, save) in acts.items():
            if dname != "bf16" and (act_name not in classes or (quick and act_name == "squared_relu")):
                continue
            # (quick: squared_relu for its backward alone, forward stores D as gelu's does)
            backward_only = quick and act_name == "squared_relu"
            for sname, (m, k, n) in shapes.items():
                if backward_only and sname != "train":
                    continue
                x = torch.zeros(m, k, dtype=dtype)
                w = torch.zeros(n, k, dtype=dtype)
                b = torch.zeros(n, dtype=dtype)
                for save_mode in sorted({0, save}) if not backward_only else ():
                    for bias in ((b, None) if save_mode == save else (b,)):
                        tma = [False] + ([True] if arch >= 90 and sname != "decode" else [])
                        for force_tma in tma:
                            comp.variant = (f"fwd {dname} {act_name} save={save_mode} bias={bias is not None} "
                                            f"{sname} tma={force_tma}")
                            K.forward(x, w, bias, code, save_mode, wrap=comp, force_tma=force_tma)
                if act_name not in classes:
                    continue
                dy = torch.zeros(m, n, dtype=dtype)
                saved = (torch.zeros(m, (n + 7) // 8, dtype=torch.uint8) if save == 1
                         else torch.zeros(m, n, dtype=dtype) if save >= 2 else dy.new_empty((0,)))
                comp.variant = f"bwd {dname} {act_name} {sname}"
                K.dgrad(dy, saved, save, act_name == "leaky_relu", w, wrap=comp)
                if save and sname == "train":  # the MLP block's hidden gradient: act' as dgrad's epilogue
                    e = (torch.zeros(m, (k + 7) // 8, dtype=torch.uint8) if save == 1
                         else torch.zeros(m, k, dtype=dtype))
                    comp.variant = f"bwd {dname} {act_name} {sname} act' epilogue"
                    K.dgrad(dy, dy, 0, act_name == "leaky_relu", w, wrap=comp, epilogue=e, epilogue_mode=save)
                    comp.variant = f"bwd {dname} {act_name} {sname}"
                for need_dw, need_db in ((True, True), (True, False), (False, True)):
                    K.wgrad(dy, saved, save, act_name == "leaky_relu", x if need_dw else x.new_empty((0,)),
                            need_dw, need_db, wrap=comp)
                if quick and act_name == "relu":  # the identity's wgrad (every MLP's fc2), with a bias
                    comp.variant = f"bwd {dname} identity {sname}"
                    K.wgrad(dy, dy.new_empty((0,)), 0, False, x, True, True, wrap=comp)
                    comp.variant = f"bwd {dname} {act_name} {sname}"
                comp.variant = f"bwd {dname} {act_name} {sname} split-m"
                K.wgrad(dy, saved, save, act_name == "leaky_relu", x, True, True, wrap=comp, force_split_m=4)
        for sname, (m, k, n) in shapes.items():
            if quick and dname != "bf16" and sname != "train":
                continue
            x = torch.zeros(m, k, dtype=dtype)
            wg, wu = torch.zeros(n, k, dtype=dtype), torch.zeros(n, k, dtype=dtype)
            b = torch.zeros(n, dtype=dtype)
            for save in (True, False):
                comp.variant = f"glu {dname} swiglu save={save} {sname}"
                G.forward(x, wg, wu, b, b, 4, save, wrap=comp)
            dy = torch.zeros(m, n, dtype=dtype)
            a_, b_ = torch.zeros(m, n, dtype=dtype), torch.zeros(m, n, dtype=dtype)
            for threshold in (False, True):  # (True: reglu's gate)
                comp.variant = f"glu bwd {dname} {sname} gate_threshold={threshold}"
                G.backward(dy, x, wg, wu, a_, b_, True, True, True, True, True, gate_threshold=threshold, wrap=comp)
    torch.backends.cuda.matmul.allow_tf32 = False
    return comp


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, choices=sorted(TARGETS), required=True)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--quick", action="store_true", help="bf16 and fp32-tf32, relu and gelu, two shapes")
    args = p.parse_args(argv)
    start = time.time()
    comp = run(args.arch, args.quick)
    rows = sorted(comp.rows.values(), key=lambda r: (r["kernel"], -r["shared"]))
    print(f"triton {triton.__version__}, target sm_{args.arch}{'a' if args.arch == 90 else ''}: "
          f"{len(rows)} kernels compiled in {time.time() - start:.0f} s, {len(comp.failures)} failures, "
          f"{sum(r['spill_stores'] > 0 for r in rows)} spilling")
    print("kernel | BLOCK_M x BLOCK_N x BLOCK_K | warps | stages | shared B | regs | spill st/ld B | dtype etc.")
    for r in rows:
        tile = "x".join(str(r.get(k, "-")) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        extras = " ".join(f"{k}={r[k]}" for k in ("ACT", "SAVE", "DOT", "DUAL", "EPI", "HAS_BIAS") if k in r)
        print(f"{r['kernel']} | {tile} | {r.get('num_warps', '-')} | {r.get('num_stages', '-')} | {r['shared']} | "
              f"{r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {extras} ({sorted(r['variants'])[0]})")
    for f in comp.failures:
        print("FAILED", json.dumps(f))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, failures=comp.failures,
                           kernels=[{**r, "variants": sorted(r["variants"])} for r in rows]), f, indent=1)
    return 1 if comp.failures else 0


if __name__ == "__main__":
    sys.exit(main())
