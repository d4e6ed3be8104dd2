"""Triton kernels for the gated unit y = act(x @ Wg^T + bg) * (x @ Wu^T + bu).

Forward: one kernel loads each x tile once and multiplies it into both the gate and the up
accumulators; the epilogue forms y and, for backward, A = act(z_gate) and B = z_up * act'(z_gate),
so that dZ_up = dY * A and dZ_gate = dY * B are single multiplies inside the backward GEMMs.
Backward reuses the linear_act kernels: dgrad in its dual form, dX = (dY * B) @ Wg + (dY * A) @ Wu
in one pass over dY; wgrad once per weight (dWg, dbg from B; dWu, dbu from A).
"""
import torch
import triton
import triton.language as tl

from .activations import act_fwd, act_grad
from .common import dot_precision, grouped_tile, m_bucket, store_tile, tuned
from .linear_act import SAVE_DERIV, SAVE_DERIV_THRESHOLD, _cfg, _identity, dgrad, pick, wgrad


@triton.jit
def linear_glu_fwd_kernel(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, y_ptr, a_ptr, b_ptr, M, N, K, M_BUCKET, stride_xm,
                          stride_xk, stride_wgn, stride_wgk, stride_wun, stride_wuk, stride_ym, stride_sm,
                          ACT: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, SAVE: tl.constexpr,
                          DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk
    wg_ptrs = wg_ptr + offs_k.to(tl.int64)[:, None] * stride_wgk + offs_n.to(tl.int64)[None, :] * stride_wgn
    wu_ptrs = wu_ptr + offs_k.to(tl.int64)[:, None] * stride_wuk + offs_n.to(tl.int64)[None, :] * stride_wun
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + offs_k) < K
        w_mask = k_ok[:, None] & (offs_n[None, :] < N)
        a = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        acc_g = tl.dot(a, tl.load(wg_ptrs, mask=w_mask, other=0.0), acc_g, input_precision=DOT)
        acc_u = tl.dot(a, tl.load(wu_ptrs, mask=w_mask, other=0.0), acc_u, input_precision=DOT)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wgk
        wu_ptrs += BLOCK_K * stride_wuk
    if HAS_BG:
        acc_g += tl.load(bg_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BU:
        acc_u += tl.load(bu_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    gate = act_fwd(acc_g, ACT)
    store_tile(y_ptr, gate * acc_u, offs_m, offs_n, M, N, stride_ym)
    if SAVE:
        store_tile(a_ptr, gate, offs_m, offs_n, M, N, stride_sm)
        store_tile(b_ptr, acc_u * act_grad(acc_g, ACT), offs_m, offs_n, M, N, stride_sm)


# two accumulators: tiles half as wide as linear_act's
GLU_CONFIGS = [_cfg(128, 128, 64, 3, 8), _cfg(128, 64, 64, 4, 8), _cfg(16, 64, 128, 4, 4)]
glu_tuned = tuned(linear_glu_fwd_kernel, GLU_CONFIGS)


def forward(x, wg, wu, bg, bu, act_code, save, wrap=_identity):
    """(y, A, B) for 2-D x; A and B empty unless save."""
    M, K = x.shape
    N = wg.shape[0]
    bg = bg.contiguous() if bg is not None else None
    bu = bu.contiguous() if bu is not None else None
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    a = torch.empty((M, N), dtype=x.dtype, device=x.device) if save else x.new_empty((0,))
    b = torch.empty((M, N), dtype=x.dtype, device=x.device) if save else x.new_empty((0,))
    if M == 0 or N == 0:
        return y, a, b
    kernel, meta = pick(linear_glu_fwd_kernel, glu_tuned)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    s_arg = (a, b) if save else (y, y)
    wrap(kernel)[grid](x, wg, wu, bg if bg is not None else y, bu if bu is not None else y, y, *s_arg, M, N, K,
                       m_bucket(M), x.stride(0), x.stride(1), wg.stride(0), wg.stride(1), wu.stride(0), wu.stride(1),
                       y.stride(0), a.stride(0) if save else 0, ACT=act_code, HAS_BG=bg is not None,
                       HAS_BU=bu is not None, SAVE=save, DOT=dot_precision(x.dtype), **meta)
    return y, a, b


def backward(dy, x, wg, wu, a, b, need_dx, need_dwg, need_dwu, need_dbg, need_dbu, gate_threshold=False,
             wrap=_identity):
    """(dx, dWg, dWu, dbg, dbu), None where not needed; dy contiguous. gate_threshold: the gate's
    PyTorch backward ends in threshold_backward (reglu): dZ_gate is 0 where its factor B is, whatever
    dY (where z_up is 0 and z_gate > 0 too, where PyTorch's would be dY * 0)."""
    gate_mode = SAVE_DERIV_THRESHOLD if gate_threshold else SAVE_DERIV
    dx = dgrad(dy, b, gate_mode, False, wg, saved2=a, w2=wu, wrap=wrap) if need_dx else None
    dwg, dbg = wgrad(dy, b, gate_mode, False, x, need_dwg, need_dbg, wrap=wrap)
    dwu, dbu = wgrad(dy, a, SAVE_DERIV, False, x, need_dwu, need_dbu, wrap=wrap)
    return dx, dwg, dwu, dbg, dbu
