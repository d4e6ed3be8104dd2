"""Triton kernels for y = act(x @ W^T + b) and its backward.

Forward: one GEMM kernel applies bias and activation to the fp32 accumulator in its epilogue and,
when backward will run, stores what it needs: the sign mask of z (relu, leaky_relu; 1 bit per
element) or the derivative D = act'(z) (the other activations; one element of the input dtype,
the same bytes as z). Three variants: the pointer-based kernel (any strides, any GPU, and the
interpreter), a persistent kernel loading through TMA tensor descriptors (sm90+, aligned inputs),
and split-K with a separate reducing epilogue for decode-sized M where the output has too few
tiles to fill the GPU.

Backward, with dZ = dY * D formed in registers as each dY tile is loaded:
  dgrad  dX = dZ @ W                       (act' is never re-evaluated: D was stored forward)
  wgrad  dW = dZ^T @ X, and db = sum_m dZ  (the programs of the first K block also reduce dZ's
                                            columns, deterministically, in the same pass over dY)
Why store D rather than z: forming dZ from z inside the GEMMs would evaluate act' once per
output tile that reads it (K / BLOCK_K times for dgrad): for gelu that is ~40 CUDA-core flops per
evaluation against the 2 tensor-core flops per element per K step the GEMM does, several times
the GEMM itself. Materialising dZ in a separate pass instead costs an extra write and read of
M x N. Storing D costs the forward epilogue one act' evaluation per element and nothing more.

In the MLP block (fastnn.mlp), fc2's dgrad dH = dY @ W2 takes fc1's D as its epilogue instead
(dgrad's EPI): it stores dZ1 = dH * D1 directly, and fc1's dgrad and wgrad run without a prologue.
Per element of [M, hidden], that reads D1 once and writes and reads dZ1 (4 passes) where
storing dH and multiplying D1 into both of fc1's kernels makes 5.
"""
import os

import torch
import triton
import triton.language as tl

from .activations import LEAKY_SLOPE, act_fwd, act_grad, mask_bit
from .common import (autotuning, capability, dot_precision, grouped_tile, interpreting, load_sign_mask,
                     load_tile, m_bucket, num_sms, pointers_real, store_sign_mask, store_tile, tuned)

# What forward stores for backward: nothing, the sign mask (relu, leaky_relu), or D = act'(z); D of
# an activation whose PyTorch backward ends in threshold_backward (squared_relu; reglu's gate
# factor z_up * relu'(z_gate)) is SAVE_DERIV_THRESHOLD: backward's dZ is then exactly 0 where D is,
# whatever dY (inf, NaN), as PyTorch's (the product would give NaN).
SAVE_NOTHING, SAVE_MASK, SAVE_DERIV, SAVE_DERIV_THRESHOLD = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def gemm_mainloop(x_ptr, w_ptr, offs_m, offs_n, k_start, k_end, M, N, stride_xm, stride_xk, stride_wn,
                  stride_wk, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """fp32 [BM, BN] tile of x[:, k_start:k_end] @ W[:, k_start:k_end]^T, masked on every edge."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k).to(tl.int64)[None, :] * stride_xk
    w_ptrs = w_ptr + (k_start + offs_k).to(tl.int64)[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_ok = (k + offs_k) < k_end
        a = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def fwd_epilogue(acc, offs_m, offs_n, pid_n, M, N, b_ptr, y_ptr, s_ptr, stride_ym, stride_sm,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """z = acc + bias in fp32; stores y = act(z) and what backward needs, each rounded once."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    store_tile(y_ptr, act_fwd(acc, ACT), offs_m, offs_n, M, N, stride_ym)
    if SAVE == 1:
        store_sign_mask(s_ptr, mask_bit(acc, ACT), offs_m, pid_n, M, N, stride_sm, BLOCK_M, BLOCK_N)
    elif SAVE == 2:
        store_tile(s_ptr, act_grad(acc, ACT), offs_m, offs_n, M, N, stride_sm)


@triton.jit
def linear_act_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, s_ptr, M, N, K, M_BUCKET, stride_xm, stride_xk, stride_wn,
                          stride_wk, stride_ym, stride_sm, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          SAVE: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = gemm_mainloop(x_ptr, w_ptr, offs_m, offs_n, 0, K, M, N, stride_xm, stride_xk, stride_wn, stride_wk,
                        DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    fwd_epilogue(acc, offs_m, offs_n, pid_n, M, N, b_ptr, y_ptr, s_ptr, stride_ym, stride_sm, ACT, HAS_BIAS, SAVE,
                 BLOCK_M, BLOCK_N)


@triton.jit
def linear_act_fwd_tma_kernel(x_ptr, w_ptr, b_ptr, y_ptr, s_ptr, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_ym,
                              stride_sm, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
                              DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr):
    """Persistent: NUM_SMS programs walk the tiles in grouped order; operands arrive by TMA
    (tensor descriptors pad the M, N and K edges with zeros)."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, input_precision=DOT)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        fwd_epilogue(acc, offs_m, offs_n, pid_n, M, N, b_ptr, y_ptr, s_ptr, stride_ym, stride_sm, ACT, HAS_BIAS,
                     SAVE, BLOCK_M, BLOCK_N)


@triton.jit
def linear_splitk_kernel(x_ptr, w_ptr, ws_ptr, M, N, K, K_PER_SPLIT, M_BUCKET, stride_xm, stride_xk, stride_wn,
                         stride_wk, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Partial products over one K range into an fp32 workspace [SPLIT_K, M, N]."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    acc = gemm_mainloop(x_ptr, w_ptr, offs_m, offs_n, k_start, k_end, M, N, stride_xm, stride_xk, stride_wn,
                        stride_wk, DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    store_tile(ws_ptr + split.to(tl.int64) * M * N, acc, offs_m, offs_n, M, N, N)


@triton.jit
def splitk_epilogue_kernel(ws_ptr, b_ptr, y_ptr, s_ptr, M, N, SPLIT_K, stride_ym, stride_sm, ACT: tl.constexpr,
                           HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """Adds the split-K partials in split order (deterministic), then the forward epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        # tl.cast, not M.to(): an integer argument equal to 1 arrives as a constexpr, which has no .to()
        acc += load_tile(ws_ptr + s * tl.cast(M, tl.int64) * N, offs_m, offs_n, M, N, N)
    fwd_epilogue(acc, offs_m, offs_n, pid_n, M, N, b_ptr, y_ptr, s_ptr, stride_ym, stride_sm, ACT, HAS_BIAS, SAVE,
                 BLOCK_M, BLOCK_N)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def times_grad_factor(g, s_ptr, offs_m, offs_n, n_start, M, N, stride_sm, SAVE: tl.constexpr, LEAKY: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dZ = g * act'(z) for a float32 [BM, BN] tile g (columns offs_n = n_start + arange(BN)), from
    what forward stored, as PyTorch's backward forms it: through the sign mask g or 0 (relu, whatever
    g) or g times the slope; through a threshold factor 0 where it is 0; else the product."""
    if SAVE == 1:
        bits = load_sign_mask(s_ptr, offs_m, n_start, M, N, stride_sm, BLOCK_M, BLOCK_N)
        if LEAKY:
            dz = tl.where(bits != 0, g, g * LEAKY_SLOPE)
        else:
            dz = tl.where(bits != 0, g, 0.0)
    else:
        d = load_tile(s_ptr, offs_m, offs_n, M, N, stride_sm)
        dz = g * d
        if SAVE == 3:
            dz = tl.where(d == 0, 0.0, dz)
    return dz


@triton.jit
def linear_act_dgrad_kernel(dy_ptr, s_ptr, w_ptr, s2_ptr, w2_ptr, e_ptr, dx_ptr, M, N, K, M_BUCKET, stride_dym,
                            stride_sm, stride_wn, stride_wk, stride_s2m, stride_w2n, stride_w2k, stride_em, stride_dxm,
                            SAVE: tl.constexpr, LEAKY: tl.constexpr, DUAL: tl.constexpr, EPI: tl.constexpr,
                            DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    """dX[M, K] = (dY * D) @ W  (+ (dY * D2) @ W2 for the gated unit); SAVE 0: D = 1.
    EPI (a save mode, with SAVE 0): the MLP block's hidden gradient, fc2's dgrad times fc1's
    act' factor E [M, K] as the epilogue, dZ1 = (dY @ W2) * E, rounded once."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n0 = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + offs_n0
        g = load_tile(dy_ptr, offs_m, offs_n, M, N, stride_dym)
        w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k.to(tl.int64)[None, :] * stride_wk,
                    mask=w_mask, other=0.0)
        dz = g
        if SAVE != 0:
            dz = times_grad_factor(g, s_ptr, offs_m, offs_n, n0, M, N, stride_sm, SAVE, LEAKY, BLOCK_M, BLOCK_N)
        acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=DOT)
        if DUAL:
            w2 = tl.load(w2_ptr + offs_n.to(tl.int64)[:, None] * stride_w2n + offs_k.to(tl.int64)[None, :] * stride_w2k,
                         mask=w_mask, other=0.0)
            dz2 = g * load_tile(s2_ptr, offs_m, offs_n, M, N, stride_s2m)
            acc = tl.dot(dz2.to(w2.dtype), w2, acc, input_precision=DOT)
    if EPI != 0:
        acc = times_grad_factor(acc, e_ptr, offs_m, offs_k, pid_k * BLOCK_K, M, K, stride_em, EPI, LEAKY, BLOCK_M,
                                BLOCK_K)
    store_tile(dx_ptr, acc, offs_m, offs_k, M, K, stride_dxm)


@triton.jit
def linear_act_wgrad_kernel(dy_ptr, s_ptr, x_ptr, dw_ptr, db_ptr, M, N, K, M_PER_SPLIT, M_BUCKET, stride_dym,
                            stride_sm, stride_xm, stride_xk, stride_dwn, SAVE: tl.constexpr, LEAKY: tl.constexpr,
                            COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, DOT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    """dW[N, K] = (dY * D)^T @ X over rows [split * M_PER_SPLIT, ...) of split = program_id(1); the
    programs of the first K block also write db = sum_m dY * D (fp32 sums of the unrounded dZ, added
    in row order: deterministic; not with SAVE 0, see wgrad). With more than one split, dw_ptr /
    db_ptr are float32 workspaces [splits, N, K] / [splits, N] that sum_splits_kernel adds up in
    split order."""
    tl.static_assert(not (COMPUTE_DB and SAVE == 0), "SAVE 0 takes db from torch's column sum (see wgrad)")
    pid_n, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_M)
    split = tl.program_id(1)
    m_lo = split * M_PER_SPLIT
    m_hi = tl.minimum(M, m_lo + M_PER_SPLIT)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m0 = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + offs_m0
        dz = load_tile(dy_ptr, offs_m, offs_n, m_hi, N, stride_dym)
        if SAVE != 0:
            dz = times_grad_factor(dz, s_ptr, offs_m, offs_n, pid_n * BLOCK_N, m_hi, N, stride_sm, SAVE, LEAKY,
                                   BLOCK_M, BLOCK_N)
        if COMPUTE_DB:
            if pid_k == 0:  # one program per column block sums the bias gradient; the others skip it
                db += tl.sum(dz, axis=0)
        if COMPUTE_DW:
            xt = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk,
                         mask=(offs_m[:, None] < m_hi) & (offs_k[None, :] < K), other=0.0)
            acc = tl.dot(tl.trans(dz.to(xt.dtype)), xt, acc, input_precision=DOT)
    if COMPUTE_DW:
        store_tile(dw_ptr + split.to(tl.int64) * tl.cast(N, tl.int64) * K, acc, offs_n, offs_k, N, K, stride_dwn)
    if COMPUTE_DB:
        if pid_k == 0:
            tl.store(db_ptr + split.to(tl.int64) * N + offs_n, db.to(db_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def sum_splits_kernel(ws_ptr, out_ptr, TOTAL, SPLITS, BLOCK: tl.constexpr):
    """out[i] = sum over s of ws[s, i], in split order (deterministic), rounded once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(ws_ptr + s * tl.cast(TOTAL, tl.int64) + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, stages, warps, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_stages=stages,
                         num_warps=warps)


# Small pruned sets (autotuning compiles every config of every kernel variant it meets): the
# large tiles Hopper and Ampere like for bf16 / fp16, a middle tile, and narrow-M tiles for
# decode-sized batches. Each kernel is tuned per (M bucket, N, K) and variant (common.tuned).
FWD_CONFIGS = [_cfg(128, 256, 64, 3, 8), _cfg(128, 128, 64, 4, 8), _cfg(64, 128, 64, 4, 4), _cfg(16, 128, 128, 3, 4)]
TMA_CONFIGS = [_cfg(128, 256, 64, 3, 8), _cfg(128, 128, 64, 4, 8)]
SPLITK_CONFIGS = [_cfg(16, 128, 128, 3, 4), _cfg(32, 64, 128, 4, 4)]
# backward: BLOCK_N is the reduction (dgrad) or output (wgrad) axis of the N dimension
DGRAD_CONFIGS = [_cfg(128, 64, 128, 3, 8), _cfg(64, 64, 128, 4, 4)]
# (the wgrad kernel is off on GPUs by default until a GPU run checks the fix of its pipelining hazard,
# see wgrad_kernel_on_gpu; tests/test_triton.py runs each config alone)
WGRAD_CONFIGS = [_cfg(64, 128, 128, 3, 8), _cfg(64, 64, 128, 4, 4)]
# the one config of the interpreter and of FASTNN_TRITON_AUTOTUNE=0 (tl.dot needs blocks >= 16)
FIXED = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
FIXED_GPU = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}

fwd_tuned = tuned(linear_act_fwd_kernel, FWD_CONFIGS)
fwd_tma_tuned = tuned(linear_act_fwd_tma_kernel, TMA_CONFIGS)
splitk_tuned = tuned(linear_splitk_kernel, SPLITK_CONFIGS)
dgrad_tuned = tuned(linear_act_dgrad_kernel, DGRAD_CONFIGS)
wgrad_tuned = tuned(linear_act_wgrad_kernel, WGRAD_CONFIGS)


def pick(kernel, tuned):
    """(kernel to launch, its meta-parameters): autotuned on a GPU, one fixed config otherwise."""
    if autotuning():
        return tuned, {}
    return kernel, dict(FIXED if interpreting() else FIXED_GPU)


def _identity(k):
    return k


# ---------------------------------------------------------------------------------------------
# launchers (torch tensors in, torch tensors out); `wrap` is torch.library.wrap_triton inside a
# triton_op, so that torch.compile sees the kernels
# ---------------------------------------------------------------------------------------------
def _tma_ok(x, w, force):
    if force is not None:
        return force
    # where pointers are not real (torch.compile tracing, a fake kernel run) the pointer kernel,
    # which takes any alignment, is traced instead
    if interpreting() or not pointers_real(x, w) or capability(x.device)[0] < 9:
        return False
    es = x.element_size()
    return (x.stride(1) == 1 and w.stride(1) == 1 and (x.stride(0) * es) % 16 == 0 and (w.stride(0) * es) % 16 == 0
            and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0 and x.shape[1] * es >= 16)


def _tma_scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """Device-side tensor descriptors need scratch memory: take it from torch's caching allocator.
    Set before every TMA launch: Triton keeps the allocator per thread, and backward runs on
    autograd's threads (and servers call from many)."""
    triton.set_allocator(_tma_scratch)


def _split_k(m, n, k, device, force):
    """Splits of K for decode-sized M, when the output tiles alone cannot fill the GPU."""
    if force is not None:
        return force
    if m > 64 or k < 1024:
        return 1
    tiles = triton.cdiv(m, 16) * triton.cdiv(n, 128)
    sms = num_sms(device)
    if tiles * 2 >= sms:
        return 1
    return max(1, min(8, sms // tiles, k // 512))


def forward(x, w, b, act_code, save_mode, wrap=_identity, force_tma=None, force_split_k=None):
    """y = act(x @ w^T + b) for 2-D x; returns (y, saved) with saved per save_mode."""
    save_mode = min(save_mode, SAVE_DERIV)  # D is stored alike for backward's two ways of applying it
    M, K = x.shape
    N = w.shape[0]
    b = b.contiguous() if b is not None else None
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if save_mode == SAVE_MASK:
        saved = torch.empty((M, (N + 7) // 8), dtype=torch.uint8, device=x.device)
    elif save_mode == SAVE_DERIV:
        saved = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        saved = x.new_empty((0,))
    if M == 0 or N == 0:
        return y, saved
    if K == 0:  # no product: the epilogue of a zero accumulator
        force_split_k = 1
    b_arg = b if b is not None else y
    s_arg = saved if save_mode != SAVE_NOTHING else y
    s_stride = saved.stride(0) if save_mode != SAVE_NOTHING else 0
    common = dict(ACT=act_code, HAS_BIAS=b is not None, SAVE=save_mode, DOT=dot_precision(x.dtype))
    split = _split_k(M, N, K, x.device, force_split_k)
    if split > 1 or K == 0:
        kernel, meta = pick(linear_splitk_kernel, splitk_tuned)
        bk = meta.get("BLOCK_K", 128)
        k_per_split = triton.cdiv(triton.cdiv(max(K, 1), split), bk) * bk
        split = max(1, triton.cdiv(K, k_per_split)) if K else 1
        # every split writes its whole [M, N] slice (no split's K range is empty): no zero fill
        # unless nothing is launched (K == 0)
        ws = (torch.empty if K else torch.zeros)((split, M, N), dtype=torch.float32, device=x.device)
        if K:
            grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]), split)  # noqa: E731
            wrap(kernel)[grid](x, w, ws, M, N, K, k_per_split, m_bucket(M), x.stride(0), x.stride(1), w.stride(0),
                               w.stride(1), DOT=common["DOT"], **meta)
        ep_grid = (triton.cdiv(M, 32), triton.cdiv(N, 64))
        wrap(splitk_epilogue_kernel)[ep_grid](ws, b_arg, y, s_arg, M, N, split, y.stride(0), s_stride, ACT=act_code,
                                              HAS_BIAS=b is not None, SAVE=save_mode, BLOCK_M=32, BLOCK_N=64)
        return y, saved
    if _tma_ok(x, w, force_tma):
        kernel, meta = pick(linear_act_fwd_tma_kernel, fwd_tma_tuned)
        if not interpreting():
            _ensure_allocator()
        sms = num_sms(x.device)
        grid = lambda META: (min(sms, triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"])),)  # noqa: E731
        wrap(kernel)[grid](x, w, b_arg, y, s_arg, M, N, K, m_bucket(M), x.stride(0), w.stride(0), y.stride(0),
                           s_stride, NUM_SMS=sms, **common, **meta)
        return y, saved
    kernel, meta = pick(linear_act_fwd_kernel, fwd_tuned)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    wrap(kernel)[grid](x, w, b_arg, y, s_arg, M, N, K, m_bucket(M), x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                       y.stride(0), s_stride, **common, **meta)
    return y, saved


def dgrad(dy, saved, save_mode, leaky, w, saved2=None, w2=None, wrap=_identity, epilogue=None, epilogue_mode=0):
    """dX = (dY * D) @ W (+ (dY * D2) @ W2); dy contiguous. epilogue (with save_mode 0): E, what
    linear_act's forward saved for a [M, K] output in epilogue_mode, and dX = (dY @ W) * E."""
    M, N = dy.shape
    K = w.shape[1]
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    dual = saved2 is not None
    s = saved if save_mode != SAVE_NOTHING else dy
    s2, w2_ = (saved2, w2) if dual else (dy, w)
    e = epilogue if epilogue_mode != SAVE_NOTHING else dy
    kernel, meta = pick(linear_act_dgrad_kernel, dgrad_tuned)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"]),)  # noqa: E731
    wrap(kernel)[grid](dy, s, w, s2, w2_, e, dx, M, N, K, m_bucket(M), dy.stride(0), s.stride(0) if s.dim() == 2 else 0,
                       w.stride(0), w.stride(1), s2.stride(0), w2_.stride(0), w2_.stride(1), e.stride(0), dx.stride(0),
                       SAVE=save_mode, LEAKY=leaky, DUAL=dual, EPI=epilogue_mode, DOT=dot_precision(dy.dtype), **meta)
    return dx


def _split_m(m, n, k, device, force):
    """Splits of M for wgrad when its N x K output tiles fill fewer than two waves of the GPU
    (BERT-base's 768 x 768 dW is 36 tiles of 128 x 128 on 132 SMs). A function of the shape and
    the GPU's SM count: the summation order is the same on every run."""
    if force is not None:
        return force
    if m < 2048:
        return 1
    tiles = triton.cdiv(n, 128) * triton.cdiv(max(k, 1), 128)
    sms = num_sms(device)
    if tiles * 2 >= sms:
        return 1
    return max(1, min(8, triton.cdiv(2 * sms, tiles), m // 1024))


def wgrad_kernel_on_gpu() -> bool:
    """Whether wgrad runs its Triton kernel on a GPU (under the interpreter it always does). Not by
    default: on an H200 with Triton 3.6 (2026-12-04) the compiled kernel gave wrong bf16 dW for the
    identity with a bias (fc2 of GPT-2 XL's MLP, 8192 x 6400 -> 1600: errors 17-53 where PyTorch's
    was 1, with the 3-stage configs), while the interpreter computed the same logic exactly. The
    likely cause, found later in the sm_90a TTGIR, is a pipelining hazard (see wgrad), fixed without
    a GPU to check the fix: until a GPU run shows the kernel right, dW on a GPU is torch's GEMM
    (wgrad_by_torch). FASTNN_TRITON_WGRAD=kernel runs the kernel (the GPU test of each config does)."""
    return os.environ.get("FASTNN_TRITON_WGRAD", "torch") == "kernel"


def wgrad_by_torch(dy, saved, save_mode, leaky, x, need_dw, need_db):
    """wgrad's results from torch's GEMM and a float32 column sum: dZ = dY * D formed in float32,
    rounded to dY's dtype for the GEMM (as the kernel rounds its tiles) and summed unrounded for db."""
    M, N = dy.shape
    if save_mode == SAVE_NOTHING:
        dz, db = dy, (dy.sum(0, dtype=torch.float32) if need_db else None)
    else:
        g = dy.float()
        if save_mode == SAVE_MASK:
            shifts = torch.arange(8, dtype=torch.uint8, device=dy.device)
            nbytes = (N + 7) // 8
            bits = ((saved[:, :nbytes, None] >> shifts) & 1).reshape(M, nbytes * 8)[:, :N].bool()
            dz32 = torch.where(bits, g, g * LEAKY_SLOPE.value if leaky else torch.zeros_like(g))
        else:  # (times_grad_factor's forms)
            d = saved[:, :N].float()
            dz32 = g * d
            if save_mode == SAVE_DERIV_THRESHOLD:
                dz32 = torch.where(d == 0, torch.zeros_like(dz32), dz32)
        dz, db = dz32.to(dy.dtype), (dz32.sum(0) if need_db else None)
    dw = torch.mm(dz.t(), x) if need_dw else None
    return dw, (db.to(dy.dtype) if need_db else None)


def wgrad(dy, saved, save_mode, leaky, x, need_dw, need_db, wrap=_identity, force_split_m=None):
    """(dW = (dY * D)^T @ X or None, db = column sums of dY * D or None); dy contiguous.

    Without a saved factor (SAVE_NOTHING: dZ = dY) db is torch's float32 column sum of dY, not the
    kernel's: summing in the kernel the dY tile that its dot also reads from shared memory makes
    Triton's pipeliner (3.6 and 3.9, sm_90a) give that tile's buffer one slot fewer than the
    stages while the asynchronous wgmma still reads it, so the copy of a later tile can overwrite
    the operand of the dot in flight. That fits the wrong bfloat16 dW an H200 gave at
    8192 x 6400 -> 1600 with the 3-stage configs (2026-12-04; not rerun on a GPU since); the TTGIR
    shows the short buffer (tests/test_triton_compile.py checks it is gone). With a factor, dZ is
    formed in registers and the dot reads it from there."""
    if not interpreting() and not wgrad_kernel_on_gpu():
        return wgrad_by_torch(dy, saved, save_mode, leaky, x, need_dw, need_db)
    if need_db and save_mode == SAVE_NOTHING:
        dw, _ = wgrad(dy, saved, save_mode, leaky, x, need_dw, False, wrap, force_split_m)
        return dw, dy.sum(0, dtype=torch.float32).to(dy.dtype)
    M, N = dy.shape
    K = x.shape[1] if need_dw else 0  # x is an empty stand-in when dW is not asked for
    dw = torch.empty((N, K), dtype=dy.dtype, device=dy.device) if need_dw else None
    db = torch.empty((N,), dtype=dy.dtype, device=dy.device) if need_db else None
    if N == 0 or not (need_dw or need_db):
        return dw, db
    if M == 0:
        return (dw.zero_() if need_dw else None), (db.zero_() if need_db else None)
    compute_dw = need_dw and K > 0
    s = saved if save_mode != SAVE_NOTHING else dy
    split = _split_m(M, N, K, dy.device, force_split_m) if compute_dw else 1
    m_per_split = triton.cdiv(triton.cdiv(M, split), 128) * 128 if split > 1 else M
    split = triton.cdiv(M, m_per_split)
    f32 = dict(dtype=torch.float32, device=dy.device)
    dw_arg = (torch.empty((split, N, K), **f32) if split > 1 else dw) if compute_dw else dy
    db_arg = (torch.empty((split, N), **f32) if split > 1 else db) if need_db else dy
    kernel, meta = pick(linear_act_wgrad_kernel, wgrad_tuned)
    k_blocks = (lambda META: triton.cdiv(K, META["BLOCK_K"])) if compute_dw else (lambda META: 1)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]) * k_blocks(META), split)  # noqa: E731
    wrap(kernel)[grid](dy, s, x, dw_arg, db_arg, M, N, max(K, 1) if compute_dw else 1, m_per_split, m_bucket(M),
                       dy.stride(0), s.stride(0) if s.dim() == 2 else 0, x.stride(0) if x.dim() == 2 else 0,
                       x.stride(1) if x.dim() == 2 else 0, K if compute_dw else 0, SAVE=save_mode, LEAKY=leaky,
                       COMPUTE_DW=compute_dw, COMPUTE_DB=need_db, DOT=dot_precision(dy.dtype), **meta)
    if split > 1:
        for ws, out in ((dw_arg, dw), (db_arg, db)):  # (split > 1 only when dW is computed; db may be None)
            if out is not None:
                total = out.numel()
                wrap(sum_splits_kernel)[(triton.cdiv(total, 1024),)](ws, out, total, split, BLOCK=1024)
    return dw, db
