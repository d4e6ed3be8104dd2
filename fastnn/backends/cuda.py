"""The `cuda` backend: cuBLASLt GEMMs with their epilogues, and fastnn's CUDA kernels for what
cuBLASLt lacks (csrc/cuda). The native module fastnn._cuda is imported on first use.

Forward
  identity, relu, gelu_tanh: one cuBLASLt call with the matching epilogue (BIAS, RELU_BIAS,
    GELU_BIAS; when backward will run RELU_AUX_BIAS keeps a 1-bit sign mask and GELU_AUX_BIAS the
    pre-activation). cuBLASLt's GELU is the tanh form, so it serves gelu_tanh only.
  the others: cuBLASLt GEMM with the BIAS epilogue into z (kept for backward), then one fused
    kernel y = act(z). (As in PyTorch's eager Linear + activation, z is rounded to the dtype
    before the activation; the fused Triton kernels avoid that rounding.)
  Where cuBLASLt has no algorithm for an epilogue (alignment, shapes), the GEMM runs without it
  and fastnn's kernels do the epilogue, producing the same saved layout.
Backward
  one fused kernel dZ = dY * act'(z) with the bias gradient (a deterministic column reduction),
  then dX = dZ @ W and dW = dZ^T @ X on cuBLASLt. identity needs no elementwise pass at all: the
  wgrad GEMM's BGRADB epilogue reduces the bias gradient.
Saved layouts: the sign mask is cuBLASLt's (rows of relu_aux_ld(N) bits); gelu_tanh's z has rows
of gelu_aux_ld(N) elements (cuBLASLt's aux leading dimension); other activations keep z [M, N].
"""
from __future__ import annotations

import torch

from .. import _native
from .base import Backend, empty_like_nothing, tf32_allowed

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# fastnn::cuda::Epilogue codes (csrc/cuda/lt_gemm.h)
(NONE, BIAS, RELU_BIAS, RELU_AUX_BIAS, GELU_BIAS, GELU_AUX_BIAS, DRELU_BGRAD, DGELU_BGRAD, BGRADB, RELU, RELU_AUX, GELU,
 GELU_AUX) = range(13)


def relu_aux_ld(n: int) -> int:
    """Bits per row of the sign mask (cuBLASLt wants a multiple of 128)."""
    return (n + 127) // 128 * 128


def gelu_aux_ld(n: int) -> int:
    """Elements per row of gelu_tanh's kept pre-activation (cuBLASLt wants a multiple of 8)."""
    return (n + 7) // 8 * 8


def _workspace(device) -> torch.Tensor:
    """cuBLASLt workspace from torch's caching allocator (cheap to take per call)."""
    big = torch.cuda.get_device_capability(device)[0] >= 9
    return torch.empty((32 if big else 4) << 20, dtype=torch.uint8, device=device)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (cuBLASLt reads rows with any leading dimension >= cols)."""
    if t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= max(1, t.shape[1]):
        return t
    return t.contiguous()


def _ptr(t):
    return 0 if t is None else t.data_ptr()


class _Call:
    """Device, stream, dtype and workspace of one op call."""

    def __init__(self, like: torch.Tensor):
        self.C = _native.cuda_module()
        self.device = like.device.index if like.device.index is not None else torch.cuda.current_device()
        self.stream = torch.cuda.current_stream(like.device).cuda_stream
        self.dtype = _native.DTYPE_CODES[like.dtype]
        self.tf32 = like.dtype == torch.float32 and tf32_allowed()
        self.ws = _workspace(like.device)

    def gemm(self, m, n, k, a, lda, trans_a, b, ldb, trans_b, d, ldd, accumulate=False, epilogue=NONE, bias=None,
             bias_grad=None, aux=None, aux_ld=0):
        """Row-major D[m, n] = op(A) @ op(B) (+ D); False when cuBLASLt has no algorithm."""
        return self.C.lt_gemm(self.device, self.stream, self.dtype, self.tf32, m, n, k, a.data_ptr(), lda, trans_a,
                              b.data_ptr(), ldb, trans_b, d.data_ptr(), ldd, accumulate, epilogue, _ptr(bias),
                              _ptr(bias_grad), _ptr(aux), aux_ld, self.ws.data_ptr(), self.ws.numel())

    def linear(self, x, w, out, ld_out, bias=None, epilogue=None, aux=None, aux_ld=0):
        """out[:, :N] = x @ w^T (+ bias, epilogue); True when done (the plain GEMM always is)."""
        m, k = x.shape
        n = w.shape[0]
        if epilogue is None:
            epilogue = BIAS if bias is not None else NONE
        if k == 0:
            if epilogue not in (NONE, BIAS):
                return False
            view = out.as_strided((m, n), (ld_out, 1))
            view.copy_(bias.expand(m, n) if bias is not None else torch.zeros((), dtype=out.dtype, device=out.device))
            return True
        if self.gemm(m, n, k, x, x.stride(0), False, w, w.stride(0), True, out, ld_out, epilogue=epilogue, bias=bias,
                     aux=aux, aux_ld=aux_ld):
            return True
        if epilogue not in (NONE, BIAS):
            return False
        # cuBLASLt declined even the plain GEMM (unusual strides): torch's GEMM, same numerics
        res = torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())
        out.as_strided((m, n), (ld_out, 1)).copy_(res)
        return True


class CudaBackend(Backend):
    name = "cuda"

    def unsupported_reason(self, op, x, weights, act):
        if x.device.type != "cuda":
            return f"it runs on CUDA tensors; these are on {x.device}"
        if _native.cuda_module() is None:
            return f"the CUDA module fastnn._cuda is not available ({_native.cuda_module_error()})"
        if x.dtype not in _DTYPES:
            return f"it supports float32, bfloat16 and float16, not {x.dtype}"
        return None

    def saved_spec(self, act, rows, cols, dtype):
        if act.saves == "mask":
            return (rows, relu_aux_ld(cols) // 8), torch.uint8
        if act.saves == "preact":
            return (rows, gelu_aux_ld(cols) if act.name == "gelu_tanh" else cols), dtype
        return (0,), dtype

    # -- linear_act ----------------------------------------------------------------------------
    def linear_act_fwd(self, x, weight, bias, act, save):
        x, weight = _row_major(x), _row_major(weight)
        bias = None if bias is None else bias.contiguous()
        m, n = x.shape[0], weight.shape[0]
        saves = act.saves if save else "nothing"
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        shape, dtype = self.saved_spec(act, m, n, x.dtype)
        saved = torch.empty(shape, dtype=dtype, device=x.device) if saves != "nothing" else empty_like_nothing(x)
        if m == 0 or n == 0:
            return y, saved
        with torch.cuda.device(x.device):
            call = _Call(x)
            if act.name in ("relu", "gelu_tanh", "identity"):
                if self._lt_epilogue_forward(call, x, weight, bias, act, saves, y, saved):
                    return y, saved
            # GEMM (+ bias) into z, then fastnn's epilogue kernel
            if saves == "preact":
                z, ld_z = saved, saved.shape[1]
            else:
                z, ld_z = y, n
            call.linear(x, weight, z, ld_z, bias=bias)
            mask = saved if saves == "mask" else None
            if act.name != "identity" or z is not y:
                call.C.bias_act_forward(call.device, call.stream, call.dtype, act.code, m, n, z.data_ptr(), ld_z, 0,
                                        y.data_ptr(), n, _ptr(mask), relu_aux_ld(n))
        return y, saved

    @staticmethod
    def _lt_epilogue_forward(call, x, weight, bias, act, saves, y, saved):
        """The whole forward in one cuBLASLt call, where an epilogue exists for it."""
        n = weight.shape[0]
        b = bias is not None
        if act.name == "identity":
            return call.linear(x, weight, y, n, bias=bias)
        if act.name == "relu":
            if saves == "mask":
                return call.linear(x, weight, y, n, bias=bias, epilogue=RELU_AUX_BIAS if b else RELU_AUX, aux=saved,
                                   aux_ld=relu_aux_ld(n))
            return call.linear(x, weight, y, n, bias=bias, epilogue=RELU_BIAS if b else RELU)
        if saves == "preact":  # gelu_tanh
            return call.linear(x, weight, y, n, bias=bias, epilogue=GELU_AUX_BIAS if b else GELU_AUX, aux=saved,
                               aux_ld=gelu_aux_ld(n))
        return call.linear(x, weight, y, n, bias=bias, epilogue=GELU_BIAS if b else GELU)

    def linear_act_bwd(self, dy, x, weight, bias, saved, act, need_dx, need_dw, need_db):
        dy = dy.contiguous()
        m, n = dy.shape
        with torch.cuda.device(dy.device):
            call = _Call(dy)
            db = None
            if act.saves == "nothing":
                dz = dy
                if need_dw and need_db:
                    dw, db = self._wgrad(call, dz, x, with_bias_grad=True)
                else:
                    dw = self._wgrad(call, dz, x)[0] if need_dw else None
                if need_db and db is None:
                    db = self._bias_grad_only(call, dy, act)
            else:
                dz = torch.empty_like(dy)
                bias_grad = torch.empty(n, dtype=torch.float32, device=dy.device) if need_db else None
                partial = torch.empty(call.C.bias_grad_scratch_elems(m, n), dtype=torch.float32,
                                      device=dy.device) if need_db else None
                z, ld_z, mask = (saved, saved.shape[1], None) if act.saves == "preact" else (None, 0, saved)
                call.C.act_backward(call.device, call.stream, call.dtype, act.code, m, n, dy.data_ptr(), n, _ptr(z), ld_z,
                                    _ptr(mask), relu_aux_ld(n), dz.data_ptr(), n, _ptr(bias_grad), _ptr(partial))
                db = bias_grad.to(dy.dtype) if need_db else None
                dw = self._wgrad(call, dz, x)[0] if need_dw else None
            dx = self._dgrad(call, dz, weight) if need_dx else None
        return dx, dw, db

    @staticmethod
    def _bias_grad_only(call, dy, act):
        m, n = dy.shape
        bias_grad = torch.empty(n, dtype=torch.float32, device=dy.device)
        partial = torch.empty(call.C.bias_grad_scratch_elems(m, n), dtype=torch.float32, device=dy.device)
        call.C.act_backward(call.device, call.stream, call.dtype, 0, m, n, dy.data_ptr(), n, 0, 0, 0, 0, 0, n,
                            bias_grad.data_ptr(), partial.data_ptr())
        return bias_grad.to(dy.dtype)

    @staticmethod
    def _dgrad(call, dz, weight, accumulate_into=None):
        """dX[M, K] = dZ[M, N] @ W[N, K] (+ accumulate_into)."""
        weight = _row_major(weight)
        m, n = dz.shape
        k = weight.shape[1]
        dx = accumulate_into if accumulate_into is not None else torch.empty((m, k), dtype=dz.dtype, device=dz.device)
        if m == 0 or k == 0:
            return dx
        if n == 0:
            return dx if accumulate_into is not None else dx.zero_()
        if not call.gemm(m, k, n, dz, n, False, weight, weight.stride(0), False, dx, k,
                         accumulate=accumulate_into is not None):
            res = torch.mm(dz, weight)
            dx = dx.add_(res) if accumulate_into is not None else dx.copy_(res)
        return dx

    @staticmethod
    def _wgrad(call, dz, x, with_bias_grad=False):
        """(dW[N, K] = dZ^T @ X, db from the BGRADB epilogue when asked and available)."""
        x = _row_major(x)
        m, n = dz.shape
        k = x.shape[1]
        dw = torch.empty((n, k), dtype=dz.dtype, device=dz.device)
        if n == 0 or k == 0:
            return dw, (torch.zeros(n, dtype=dz.dtype, device=dz.device) if with_bias_grad else None)
        if m == 0:
            return dw.zero_(), (torch.zeros(n, dtype=dz.dtype, device=dz.device) if with_bias_grad else None)
        if with_bias_grad:
            db = torch.empty(n, dtype=dz.dtype, device=dz.device)
            if call.gemm(n, k, m, dz, n, True, x, x.stride(0), False, dw, k, epilogue=BGRADB, bias_grad=db):
                return dw, db
        if not call.gemm(n, k, m, dz, n, True, x, x.stride(0), False, dw, k):
            dw.copy_(torch.mm(dz.t(), x))
        return dw, None

    # -- linear_glu ----------------------------------------------------------------------------
    def linear_glu_fwd(self, x, gate_weight, up_weight, gate_bias, up_bias, gate_act, save):
        x, gate_weight, up_weight = _row_major(x), _row_major(gate_weight), _row_major(up_weight)
        gate_bias = None if gate_bias is None else gate_bias.contiguous()
        up_bias = None if up_bias is None else up_bias.contiguous()
        m, n = x.shape[0], gate_weight.shape[0]
        z_gate = torch.empty((m, n), dtype=x.dtype, device=x.device)
        z_up = torch.empty((m, n), dtype=x.dtype, device=x.device)
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if m and n:
            with torch.cuda.device(x.device):
                call = _Call(x)
                call.linear(x, gate_weight, z_gate, n, bias=gate_bias)
                call.linear(x, up_weight, z_up, n, bias=up_bias)
                call.C.glu_forward(call.device, call.stream, call.dtype, gate_act.code, m, n, z_gate.data_ptr(),
                                   z_up.data_ptr(), y.data_ptr())
        if not save:
            return y, empty_like_nothing(x), empty_like_nothing(x)
        return y, z_gate, z_up

    def linear_glu_bwd(self, dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, gate_act,
                       need_dx, need_dwg, need_dwu, need_dbg, need_dbu):
        dy = dy.contiguous()
        m, n = dy.shape
        with torch.cuda.device(dy.device):
            call = _Call(dy)
            dz_gate, dz_up = torch.empty_like(dy), torch.empty_like(dy)
            f32 = dict(dtype=torch.float32, device=dy.device)
            scratch = call.C.bias_grad_scratch_elems(m, n)
            bgg = torch.empty(n, **f32) if need_dbg else None
            bgu = torch.empty(n, **f32) if need_dbu else None
            pg = torch.empty(scratch, **f32) if need_dbg else None
            pu = torch.empty(scratch, **f32) if need_dbu else None
            call.C.glu_backward(call.device, call.stream, call.dtype, gate_act.code, m, n, dy.data_ptr(),
                                z_gate.data_ptr(), z_up.data_ptr(), dz_gate.data_ptr(), dz_up.data_ptr(), _ptr(bgg),
                                _ptr(bgu), _ptr(pg), _ptr(pu))
            dx = None
            if need_dx:
                dx = self._dgrad(call, dz_gate, gate_weight)
                dx = self._dgrad(call, dz_up, up_weight, accumulate_into=dx)
            dwg = self._wgrad(call, dz_gate, x)[0] if need_dwg else None
            dwu = self._wgrad(call, dz_up, x)[0] if need_dwu else None
        return (dx, dwg, dwu, bgg.to(dy.dtype) if need_dbg else None, bgu.to(dy.dtype) if need_dbu else None)
