"""Pieces shared by the Triton kernels: tile ordering, the epilogue stores, launch configuration.

Launch configuration: on a GPU each kernel is autotuned over a small pruned set of configs keyed
on (M bucket, N, K); under the interpreter (TRITON_INTERPRET=1) or with FASTNN_TRITON_AUTOTUNE=0 a
single deterministic config is used.
"""
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotuning() -> bool:
    return not interpreting() and os.environ.get("FASTNN_TRITON_AUTOTUNE", "1") != "0"


def m_bucket(m: int) -> int:
    """Autotune key for the row count: the next power of two (batch sizes vary call to call)."""
    return 1 << max(0, (m - 1).bit_length())


def dot_precision(dtype: torch.dtype):
    """float32 runs the dot in TF32 only where torch allows it (and never under the interpreter);
    16-bit dots leave the precision to Triton (their tensor-core products are exact: asking for
    "ieee" there could only steer a compiler away from the tensor cores)."""
    if dtype != torch.float32:
        return None
    if not interpreting() and torch.backends.cuda.matmul.allow_tf32:
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


def prune_by_shared_memory(configs, named_args, **kwargs):
    """Drops configs whose pipelined tiles would not fit in shared memory (at least one stays)."""
    x = named_args.get("x_ptr", named_args.get("dy_ptr"))
    if x is None or not hasattr(x, "device"):
        return configs
    limit = shared_memory_limit(x.device)
    es = x.element_size()
    b_operands = 2 if "wu_ptr" in named_args else 1  # the gated kernel streams two weights
    kept = []
    for c in configs:
        kw = c.kwargs
        bm, bn, bk = kw.get("BLOCK_M", 64), kw.get("BLOCK_N", 64), kw.get("BLOCK_K", 32)
        tiles = (bm * bk + bn * bk * b_operands) * es
        if tiles * max(1, c.num_stages) <= limit:
            kept.append(c)
    return kept or configs[-1:]


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
def store_sign_mask(mask_ptr, z, offs_m, pid_n, M, N, stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Packs (z > 0) of a [BM, BN] tile into bytes: bit c % 8 of byte c // 8 of each row (the layout
    of the CPU backend); columns past N hold zeros in z, so their bits are 0."""
    bits = (z > 0).to(tl.int32)
    bits = tl.reshape(bits, (BLOCK_M, BLOCK_N // 8, 8))
    shifts = tl.arange(0, 8)
    packed = tl.sum(bits << shifts[None, None, :], axis=2)
    offs_b = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    ptrs = mask_ptr + offs_m.to(tl.int64)[:, None] * stride_m + offs_b[None, :]
    tl.store(ptrs, packed.to(tl.uint8), mask=(offs_m[:, None] < M) & (offs_b[None, :] < (N + 7) // 8))


@triton.jit
def load_sign_mask(mask_ptr, offs_m, offs_n, M, N, stride_m):
    """The sign bits of a [BM, BN] tile as float32 0/1."""
    ptrs = mask_ptr + offs_m.to(tl.int64)[:, None] * stride_m + (offs_n // 8)[None, :]
    byte = tl.load(ptrs, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0).to(tl.int32)
    return ((byte >> (offs_n % 8)[None, :]) & 1).to(tl.float32)
