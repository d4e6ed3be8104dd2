"""Pieces shared by the Triton kernels: tile ordering, the epilogue stores, launch configuration.

Launch configuration: on a GPU each kernel is autotuned over a small pruned set of configs keyed
on (M bucket, N, K); under the interpreter (TRITON_INTERPRET=1) or with FASTNN_TRITON_AUTOTUNE=0 a
single deterministic config is used.
"""
import os
from typing import Optional

import numpy
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from ..backends.base import interpreting, tf32_allowed  # noqa: F401  (interpreting: used by the kernels)


@triton.jit
def _loop_to_tensor_bound(out_ptr, n):
    """Counts to n + program_id: a loop whose bound is a tensor, as the kernels' row and split ranges."""
    total = 0
    for _ in range(0, n + tl.program_id(0)):
        total += 1
    tl.store(out_ptr, total)


def interpreter_fault() -> Optional[str]:
    """Why Triton's interpreter cannot run fastnn's kernels here, or None (and None when not
    interpreting). Triton 3.6's interpreter turns a loop's tensor bound into an int by int() of a
    one-element array, which numpy 2.4 refuses (triton-lang/triton#9171): every kernel then stops
    with an InterpreterError naming neither. One tiny interpreted launch tells (the triton backend
    makes it once, when imported)."""
    if not interpreting():
        return None
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_to_tensor_bound[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 -- any failure here is the reason to report
        return (f"Triton {triton.__version__}'s interpreter cannot run its kernels beside numpy {numpy.__version__} "
                f"({type(exc).__name__}: {exc}); numpy < 2.4 or a newer Triton runs them (triton-lang/triton#9171)")
    if out.item() != 3:
        return f"Triton {triton.__version__}'s interpreter counted a loop to {out.item()}, not 3"
    return None


def autotuning() -> bool:
    return not interpreting() and os.environ.get("FASTNN_TRITON_AUTOTUNE", "1") != "0"


def pointers_real(*tensors) -> bool:
    """Whether the tensors' data pointers can be read: not while torch.compile traces
    (FunctionalTensor refuses data_ptr, fake tensors give 0), nor in a run of an op's fake kernel,
    which asks for output shapes alone (DTensor's sharding propagation does that on fake tensors)."""
    if torch.compiler.is_compiling():
        return False
    return not any(is_fake(t) for t in tensors)


def m_bucket(m: int) -> int:
    """Autotune key for the row count: the next power of two (batch sizes vary call to call)."""
    return 1 << max(0, (m - 1).bit_length())


def dot_precision(dtype: torch.dtype):
    """float32 runs the dot in TF32 only where torch allows it (and never under the interpreter);
    16-bit dots leave the precision to Triton (their tensor-core products are exact: asking for
    "ieee" there could only steer a compiler away from the tensor cores)."""
    if dtype != torch.float32:
        return None
    if not interpreting() and tf32_allowed():
        return "tf32"
    return "ieee"


def num_sms(device) -> int:
    if interpreting() or torch.device(device).type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def capability(device):
    if interpreting() or torch.device(device).type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def shared_memory_limit(device) -> int:
    if interpreting() or torch.device(device).type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 48 * 1024)


# An accumulator tile costs BLOCK_M * BLOCK_N / (32 * num_warps) float32 registers per thread. Past
# this many live tile values the compiler spills (ptxas -v on sm_90a and sm_80, tests/triton_aot.py):
# one 128x256 tile over 8 warps is fine for a plain or relu epilogue, not for gelu's z and h (or
# its derivative) side by side, nor for the gated kernel's two accumulators.
TILE_REGISTERS_PER_THREAD = 128


def _kernel_kind(named_args) -> str:
    """Which kernel an autotuner is pruning for, from its pointer arguments: "gated" (the gated
    forward), "forward" (forward, TMA forward, split-K), "dgrad" or "wgrad"."""
    if "wg_ptr" in named_args:
        return "gated"
    if "w_ptr" in named_args:
        return "forward" if "x_ptr" in named_args else "dgrad"
    return "wgrad"


def _tile_values_per_thread(kind, kw, warps, kwargs, named_args):
    """Float32 values of full tiles that each thread keeps live through the forward's epilogue."""
    if kind == "gated":  # two accumulators, then act(gate) and up side by side
        tiles = 4
    elif kind == "forward":  # transcendental epilogues double it
        tiles = 2 if kwargs.get("ACT", named_args.get("ACT", 0)) not in (0, 1, 7) else 1
    else:  # backward kernels accumulate one tile; their loads stream through
        tiles = 1
    return tiles * kw.get("BLOCK_M", 64) * kw.get("BLOCK_N", 64) // (32 * warps)


def prune_configs(configs, named_args, **kwargs):
    """The configs that fit the GPU: their pipelined tiles fit in shared memory and their epilogue
    in registers. A config over shared memory is shrunk until it fits (fewer stages down to 2, then
    half the K tile), never launched as is: float32 operands need twice the bytes of the 16-bit ones
    the configs were sized for. A config whose epilogue would spill is dropped while a smaller one
    is left. Decode-sized M (<= 64) keeps only tiles of at most 64 rows where there are some; a
    kernel streaming x over a K that is not a multiple of 16 gets K tiles of at most 32.

    What each kernel streams per stage: forward x [BM, BK] and W [BN, BK] (two weights in the gated
    kernel); dgrad dY [BM, BN], the saved D [BM, BN] and W [BN, BK] (the gated form a second D and
    W); wgrad dY and D [BM, BN] and x [BM, BK]."""
    first = next((named_args[k] for k in ("x_ptr", "dy_ptr") if k in named_args), None)
    if first is None or not hasattr(first, "device"):
        return configs
    kind = _kernel_kind(named_args)
    limit = shared_memory_limit(first.device) - 1024  # the compiler's own scratch (barriers, reductions)
    es = first.element_size()
    save = kwargs.get("SAVE", named_args.get("SAVE", 0))
    saved_es = 0 if save == 0 else (1 if save == 1 else es)  # (2, 3: D in x's dtype)

    def need(kw, stages):
        bm, bn, bk = kw.get("BLOCK_M", 64), kw.get("BLOCK_N", 64), kw.get("BLOCK_K", 32)
        if kind in ("forward", "gated"):
            per_stage = (bm * bk + bn * bk * (2 if kind == "gated" else 1)) * es
        elif kind == "dgrad":
            per_stage = bm * bn * (es + saved_es) + bn * bk * es
            if kwargs.get("DUAL", named_args.get("DUAL", False)):
                per_stage += bm * bn * es + bn * bk * es
        else:  # wgrad
            per_stage = bm * bn * (es + saved_es) + bm * bk * es
        return per_stage * max(1, stages)

    # kernels that stream x (forward, gated, wgrad) over a K that is not a multiple of 16 elements:
    # the compiler cannot prove x's rows (nor W's, in the forward) 16-byte aligned, so their tiles
    # are loaded through registers, not copied to shared memory asynchronously; a K tile of 32
    # keeps that from spilling (ptxas: the 64x128x64 forward on 4 warps spills 448 B per thread at
    # K = 1000 in bf16 on sm_90a, 64x128x32 none)
    k = named_args.get("K")
    staged = kind != "dgrad" and isinstance(k, int) and k % 16 != 0
    kept, spilling, seen = [], [], set()
    for c in configs:
        kw, stages = dict(c.kwargs), c.num_stages
        if staged:
            kw["BLOCK_K"] = min(kw.get("BLOCK_K", 32), 32)
        while need(kw, stages) > limit and (stages > 2 or kw.get("BLOCK_K", 32) > 16):
            if stages > 2:
                stages -= 1
            else:
                kw["BLOCK_K"] = kw.get("BLOCK_K", 32) // 2
        key = (tuple(sorted(kw.items())), stages, c.num_warps)
        if need(kw, stages) <= limit and key not in seen:
            seen.add(key)
            fitted = triton.Config(kw, num_warps=c.num_warps, num_stages=stages)
            fits_registers = (_tile_values_per_thread(kind, kw, c.num_warps, kwargs, named_args)
                              <= TILE_REGISTERS_PER_THREAD)
            (kept if fits_registers else spilling).append(fitted)
    kept = kept or spilling or configs[-1:]
    # decode-sized M (forward and dgrad, where M is the rows of the output): tiles of at most 64
    # rows, where a config has them; a 128-row tile would be mostly padding
    rows = named_args.get("M")
    if isinstance(rows, int) and rows <= 64 and kind != "wgrad":
        kept = [c for c in kept if c.kwargs.get("BLOCK_M", 64) <= 64] or kept
    return kept


# Kernel arguments that pick a different compiled kernel (and so different register and shared
# memory needs): an autotuned choice is only reused within the same variant.
VARIANT_ARGS = ("ACT", "SAVE", "HAS_BIAS", "HAS_BG", "HAS_BU", "DOT", "DUAL", "EPI", "LEAKY", "COMPUTE_DW", "COMPUTE_DB")


def tuned(kernel, configs):
    """The kernel autotuned over configs (pruned to fit), keyed on the M bucket, N, K and its variant."""
    key = ["M_BUCKET", "N", "K"] + [a for a in VARIANT_ARGS if a in kernel.arg_names]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune_configs})(kernel)


@triton.jit
def grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a tile in grouped order: GROUP_M row blocks sweep the columns together,
    so the weight tiles they share stay in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def store_tile(ptr, value, offs_m, offs_n, M, N, stride_m):
    """Stores a [BM, BN] tile of a row-major (stride_m, 1) matrix, masked to M x N; int64 offsets."""
    ptrs = ptr + offs_m.to(tl.int64)[:, None] * stride_m + offs_n[None, :]
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def load_tile(ptr, offs_m, offs_n, M, N, stride_m):
    """Loads a [BM, BN] tile of a row-major matrix as float32 (zeros outside M x N)."""
    ptrs = ptr + offs_m.to(tl.int64)[:, None] * stride_m + offs_n[None, :]
    return tl.load(ptrs, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0).to(tl.float32)


@triton.jit
def store_sign_mask(mask_ptr, bits, offs_m, pid_n, M, N, stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Packs the int32 0 / 1 bits of a [BM, BN] tile (activations.mask_bit of z) into bytes: bit
    c % 8 of byte c // 8 of each row (the layout of the CPU backend); columns past N hold zeros in
    z, so their bits are 0."""
    bits = tl.reshape(bits, (BLOCK_M, BLOCK_N // 8, 8))
    shifts = tl.arange(0, 8)
    packed = tl.sum(bits << shifts[None, None, :], axis=2)
    offs_b = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    ptrs = mask_ptr + offs_m.to(tl.int64)[:, None] * stride_m + offs_b[None, :]
    tl.store(ptrs, packed.to(tl.uint8), mask=(offs_m[:, None] < M) & (offs_b[None, :] < (N + 7) // 8))


@triton.jit
def load_sign_mask(mask_ptr, offs_m, n_start, M, N, stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The sign bits of the [BM, BN] tile whose columns start at n_start (a multiple of 8) as float32
    0/1: its BN / 8 bytes per row loaded once and expanded, not one byte load per element."""
    offs_b = n_start // 8 + tl.arange(0, BLOCK_N // 8)
    ptrs = mask_ptr + offs_m.to(tl.int64)[:, None] * stride_m + offs_b[None, :]
    packed = tl.load(ptrs, mask=(offs_m[:, None] < M) & (offs_b[None, :] < (N + 7) // 8), other=0).to(tl.int32)
    bits = (packed[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_N)).to(tl.float32)
