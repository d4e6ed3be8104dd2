"""A CPU stand-in for fastnn._cuda, so that the cuda backend's Python (fastnn/backends/cuda.py: which
call gets which pointers, leading dimensions, saved layouts, scratch and fallbacks) runs on machines
without a GPU. Each function takes the arguments fastnn._cuda takes (csrc/cuda/bindings_cuda.cpp),
reads and writes the memory at the raw addresses as the header comments of lt_gemm.h and epilogue.h
say, and computes in float64 with the reference of each activation (tests/numerics.py's
stable_reference: fastnn's Python reference, but for gelu's forms accurate in the far tail), rounding
once. It checks what the C++ checks (codes, sizes, an epilogue without its aux, a multi-block bias
gradient without scratch) and raises there as the C++ does (tests/test_cuda_build.py compares the
two where no GPU is needed).

Memory a call writes must not overlap memory it reads (OverlapError), as a GEMM's result or a
kernel's would be undefined there, except where the element-wise kernels write an output exactly over
an input of the same layout: each element is read before its own element is written.

It is not a model of the CUDA kernels' numerics or speed: tests/test_cuda.py runs the real module on
a GPU. `decline` makes lt_gemm answer "no algorithm" for the epilogue codes in it (cuBLASLt does
that for some layouts), `wrong` makes the activation epilogues in it compute relu / gelu_tanh wrongly
(what the trust probes must catch)."""
from __future__ import annotations

import ctypes

import torch

from fastnn import _native, activations
from fastnn.backends import cuda as cb
from numerics import stable_reference

DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
ACT_BY_CODE = {a.code: a for a in activations.ACTIVATIONS.values()}
GELU_TANH = activations.get("gelu_tanh")
RELU = activations.get("relu")

# grad_rows_per_block / grad_row_blocks of csrc/cuda/epilogue.h
MAX_GRAD_ROW_BLOCKS = 1024


def grad_row_blocks(rows: int) -> int:
    per_block = -(-rows // MAX_GRAD_ROW_BLOCKS)
    rpb = 16 * (-(-per_block // 16) if per_block > 16 else 1)
    return -(-rows // rpb)


def at(addr: int, dtype: torch.dtype, rows: int, cols: int, ld: int) -> torch.Tensor:
    """The [rows, cols] matrix of `dtype` at `addr` with row stride ld, as a CPU tensor over that memory."""
    if rows == 0 or cols == 0:
        return torch.empty((rows, cols), dtype=dtype)
    if addr < 4096:  # (where the real module would fault: a test's error, not the C++'s ValueError)
        raise MemoryError(f"fastnn._cuda stand-in: address {addr:#x} for a matrix the call reads or writes")
    count = (rows - 1) * ld + cols
    size = torch.empty((), dtype=dtype).element_size()
    flat = torch.frombuffer((ctypes.c_char * (count * size)).from_address(addr), dtype=dtype, count=count)
    return flat.as_strided((rows, cols), (ld, 1))


class OverlapError(AssertionError):
    """A call writes memory it also reads (other than element by element in place), or two of its
    outputs share memory: the real call's result would be undefined."""


def span(addr, dtype, rows, cols, ld):
    """(first byte, end, row stride) of a [rows, cols] matrix at addr; None when it holds nothing."""
    if not addr or rows == 0 or cols == 0:
        return None
    size = torch.empty((), dtype=dtype).element_size()
    return addr, addr + ((rows - 1) * ld + cols) * size, ld * size


def check_overlap(call, writes, reads, in_place=False):
    """writes, reads: {name: span}. Raises OverlapError where an output overlaps an input (unless
    in_place and the two are the same matrix: same first byte, end and row stride) or another output."""
    def overlap(a, b):
        return a is not None and b is not None and a[0] < b[1] and b[0] < a[1]

    outs = list(writes.items())
    for i, (wn, w) in enumerate(outs):
        for rn, r in reads.items():
            if overlap(w, r) and not (in_place and w == r):
                raise OverlapError(f"fastnn._cuda stand-in: {call} writes {wn} over its input {rn}")
        for on, o in outs[i + 1:]:
            if overlap(w, o):
                raise OverlapError(f"fastnn._cuda stand-in: {call} writes {wn} and {on} to shared memory")


def mask_span(addr, rows, mask_ld_bits):
    return span(addr, torch.uint8, rows, mask_ld_bits // 8, mask_ld_bits // 8)


def mask_bits(addr, rows, cols, mask_ld_bits):
    """The sign mask's bits [rows, cols] (a bool copy) and its bytes (a view of the memory)."""
    data = at(addr, torch.uint8, rows, mask_ld_bits // 8, mask_ld_bits // 8)
    bits = ((data.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(rows, -1)[:, :cols]
    return bits.bool(), data


def write_mask(addr, rows, cols, mask_ld_bits, on, whole_rows=True):
    """The sign bits of [rows, cols]; whole_rows: every byte of each row (fastnn's kernel: zeros past
    the columns), else only the bytes that hold columns (what cuBLASLt's epilogue may leave)."""
    _, data = mask_bits(addr, rows, cols, mask_ld_bits)
    padded = torch.zeros(rows, mask_ld_bits, dtype=torch.uint8)
    padded[:, :cols] = on.to(torch.uint8)
    packed = (padded.reshape(rows, -1, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1).to(torch.uint8)
    width = packed.shape[1] if whole_rows else (cols + 7) // 8
    data[:, :width].copy_(packed[:, :width])


def dtype_of(code):
    # to_dtype in bindings_cuda.cpp
    if code not in DTYPES:
        raise ValueError("fastnn._cuda: dtype code must be float32, float16 or bfloat16")
    return DTYPES[code]


def act_of(code):
    # to_act in bindings_cuda.cpp
    if code not in ACT_BY_CODE:
        raise ValueError("fastnn._cuda: unknown activation code")
    return ACT_BY_CODE[code]


def mask_bit(act, z):
    # mask_bit in activations.h: relu's is !(z <= 0) (NaN passes), leaky_relu's z > 0
    return ~(z <= 0) if act.name == "relu" else z > 0


def through_mask(act, dy, on):
    # grad_through_mask in activations.h
    return torch.where(on, dy, dy * activations.LEAKY_SLOPE if act.name == "leaky_relu" else torch.zeros_like(dy))


class CudaStandIn:
    def __init__(self, decline=(), wrong=()):
        self.decline, self.wrong = set(decline), set(wrong)
        self.calls: list[str] = []

    # ---- cuBLASLt -----------------------------------------------------------------------------
    def lt_gemm(self, device, stream, dtype, allow_tf32, m, n, k, a, lda, trans_a, b, ldb, trans_b, d, ldd, accumulate,
                epilogue, bias, bias_grad, aux, aux_ld, workspace, workspace_bytes):
        if not 0 <= epilogue < len(cb.EPILOGUE_NAMES):
            raise ValueError("fastnn._cuda: unknown epilogue code")
        t = dtype_of(dtype)
        if m < 0 or n < 0 or k < 0:
            raise ValueError("fastnn cuBLASLt: negative size")
        name = cb.EPILOGUE_NAMES[epilogue]
        if "AUX" in name or "DRELU" in name or "DGELU" in name:
            if not aux:
                raise ValueError("fastnn cuBLASLt: this epilogue needs aux")
        if ("BGRAD" in name) and not bias_grad:
            raise ValueError("fastnn cuBLASLt: this epilogue needs bias_grad")
        if name.endswith("_BIAS") or name == "BIAS":
            if not bias:
                raise ValueError("fastnn cuBLASLt: this epilogue needs a bias")
            if accumulate:
                raise ValueError("fastnn cuBLASLt: accumulate and a bias epilogue together")
        if m == 0 or n == 0:
            return not ("BGRAD" in name and m > 0)
        if k == 0 or epilogue in self.decline:
            return False
        if not workspace or workspace_bytes <= 0:
            raise ValueError("fastnn._cuda stand-in: no workspace")
        self.calls.append(f"lt_gemm {name}")
        aux_written = name in ("RELU_AUX_BIAS", "RELU_AUX", "GELU_AUX_BIAS", "GELU_AUX")
        aux_span = (mask_span(aux, m, aux_ld) if "RELU" in name else span(aux, t, m, n, aux_ld)) if aux else None
        reads = {"A": span(a, t, k, m, lda) if trans_a else span(a, t, m, k, lda),
                 "B": span(b, t, n, k, ldb) if trans_b else span(b, t, k, n, ldb),
                 "bias": span(bias, t, 1, n, n) if name.endswith("_BIAS") or name == "BIAS" else None,
                 "aux": None if aux_written else aux_span}
        writes = {"D": span(d, t, m, n, ldd), "aux": aux_span if aux_written else None,
                  "bias_grad": span(bias_grad, t, 1, m if name == "BGRADB" else n, 1) if "BGRAD" in name else None}
        check_overlap("lt_gemm", writes, reads)
        A = at(a, t, k, m, lda).t() if trans_a else at(a, t, m, k, lda)
        B = at(b, t, n, k, ldb).t() if trans_b else at(b, t, k, n, ldb)
        D = at(d, t, m, n, ldd)
        acc = A.double() @ B.double()
        if accumulate:
            acc = acc + D.double()
        if name.endswith("_BIAS") or name == "BIAS":
            acc = acc + at(bias, t, 1, n, n).double()
        if name in ("RELU_BIAS", "RELU", "RELU_AUX_BIAS", "RELU_AUX"):
            if "AUX" in name:  # (the padding of its rows left as it was, as cuBLASLt may)
                write_mask(aux, m, n, aux_ld, mask_bit(RELU, acc.to(t)), whole_rows=False)
            out = RELU.fn(acc)
        elif name in ("GELU_BIAS", "GELU", "GELU_AUX_BIAS", "GELU_AUX"):
            if "AUX" in name:
                at(aux, t, m, n, aux_ld).copy_(acc.to(t))
            out = stable_reference(GELU_TANH)(acc)
        elif name == "DRELU_BGRAD":
            on, _ = mask_bits(aux, m, n, aux_ld)
            out = through_mask(RELU, acc, on)
        elif name == "DGELU_BGRAD":
            out = GELU_TANH.grad_times(acc, at(aux, t, m, n, aux_ld).double())
        else:
            out = acc
        if epilogue in self.wrong:
            out = out * 1.25 + 0.5
        if name in ("DRELU_BGRAD", "DGELU_BGRAD"):
            at(bias_grad, t, 1, n, n).copy_(out.sum(0, keepdim=True).to(t))
        elif name == "BGRADB":
            at(bias_grad, t, 1, m, m).copy_(A.double().sum(1).unsqueeze(0).to(t))
        D.copy_(out.to(t))
        return True

    # ---- fastnn's kernels ---------------------------------------------------------------------
    def bias_act_forward(self, device, stream, dtype, act, rows, cols, acc, ld_acc, bias, y, ld_y, mask,
                         mask_ld_bits):
        t, a = dtype_of(dtype), act_of(act)  # (checked first, as the binding does)
        if rows == 0 or cols == 0:
            return
        self.calls.append("bias_act_forward")
        check_overlap("bias_act_forward", {"y": span(y, t, rows, cols, ld_y), "mask": mask_span(mask, rows, mask_ld_bits)},
                      {"acc": span(acc, t, rows, cols, ld_acc), "bias": span(bias, t, 1, cols, cols)}, in_place=True)
        z = at(acc, t, rows, cols, ld_acc).double()
        if bias:
            z = z + at(bias, t, 1, cols, cols).double()
        if mask:
            if a.saves != "mask":
                raise ValueError("fastnn CUDA kernels: a sign mask is kept for relu and leaky_relu only")
            write_mask(mask, rows, cols, mask_ld_bits, mask_bit(a, z))
        at(y, t, rows, cols, ld_y).copy_(stable_reference(a)(z).to(t))

    def bias_grad_scratch_elems(self, rows, cols):
        blocks = grad_row_blocks(rows)
        return blocks * cols if blocks > 1 else 0

    def _bias_grad(self, t, rows, cols, sums, bias_grad, partial):
        """Writes the float32 column sums to bias_grad, rounded once, through the partial scratch
        where the kernels use it (whose every byte it writes: a bad address shows here)."""
        if grad_row_blocks(rows) > 1:
            if not partial:
                raise ValueError("fastnn CUDA kernels: a bias gradient over more than 16 rows needs partial scratch")
            scratch = at(partial, torch.float32, grad_row_blocks(rows), cols, cols)
            scratch.zero_()
            scratch[0].copy_(sums.float())
        at(bias_grad, t, 1, cols, cols).copy_(sums.float().unsqueeze(0).to(t))

    def act_backward(self, device, stream, dtype, act, rows, cols, dy, ld_dy, z, ld_z, mask, mask_ld_bits, dz, ld_dz,
                     bias_grad, partial):
        t, a = dtype_of(dtype), act_of(act)
        if cols == 0:
            return
        if rows == 0:
            if bias_grad:
                at(bias_grad, t, 1, cols, cols).zero_()
            return
        if a.saves == "nothing" and not bias_grad:
            return
        self.calls.append("act_backward")
        blocks = grad_row_blocks(rows) if bias_grad and partial else 0
        check_overlap("act_backward",
                      {"dz": span(dz, t, rows, cols, ld_dz) if a.saves != "nothing" else None,
                       "bias_grad": span(bias_grad, t, 1, cols, cols),
                       "partial": span(partial, torch.float32, blocks, cols, cols)},
                      {"dy": span(dy, t, rows, cols, ld_dy),
                       "z": span(z, t, rows, cols, ld_z) if a.saves == "preact" else None,
                       "mask": mask_span(mask, rows, mask_ld_bits) if a.saves == "mask" else None}, in_place=True)
        g = at(dy, t, rows, cols, ld_dy).double()
        if a.saves == "preact":
            g = a.grad_times(g, at(z, t, rows, cols, ld_z).double())
        elif a.saves == "mask":
            on, _ = mask_bits(mask, rows, cols, mask_ld_bits)
            g = through_mask(a, g, on)
        if bias_grad:
            self._bias_grad(t, rows, cols, g.sum(0), bias_grad, partial)
        if a.saves != "nothing":
            at(dz, t, rows, cols, ld_dz).copy_(g.to(t))

    def glu_forward(self, device, stream, dtype, act, rows, cols, zg, zu, y):
        t, a = dtype_of(dtype), act_of(act)
        if rows * cols == 0:
            return
        self.calls.append("glu_forward")
        check_overlap("glu_forward", {"y": span(y, t, rows, cols, cols)},
                      {"z_gate": span(zg, t, rows, cols, cols), "z_up": span(zu, t, rows, cols, cols)}, in_place=True)
        out = stable_reference(a)(at(zg, t, rows, cols, cols).double()) * at(zu, t, rows, cols, cols).double()
        at(y, t, rows, cols, cols).copy_(out.to(t))

    def glu_backward(self, device, stream, dtype, act, rows, cols, dy, zg, zu, dzg, dzu, bgg, bgu, pg, pu):
        t, a = dtype_of(dtype), act_of(act)
        if cols == 0:
            return
        if rows == 0:
            for bg in (bgg, bgu):
                if bg:
                    at(bg, t, 1, cols, cols).zero_()
            return
        self.calls.append("glu_backward")
        blocks = grad_row_blocks(rows)
        check_overlap("glu_backward",
                      {"dz_gate": span(dzg, t, rows, cols, cols), "dz_up": span(dzu, t, rows, cols, cols),
                       "bias_grad_gate": span(bgg, t, 1, cols, cols), "bias_grad_up": span(bgu, t, 1, cols, cols),
                       "partial_gate": span(pg, torch.float32, blocks, cols, cols),
                       "partial_up": span(pu, torch.float32, blocks, cols, cols)},
                      {"dy": span(dy, t, rows, cols, cols), "z_gate": span(zg, t, rows, cols, cols),
                       "z_up": span(zu, t, rows, cols, cols)}, in_place=True)
        g = at(dy, t, rows, cols, cols).double()
        zgv, zuv = at(zg, t, rows, cols, cols).double(), at(zu, t, rows, cols, cols).double()
        d_gate, d_up = a.grad_times(g * zuv, zgv), g * stable_reference(a)(zgv)
        for sums, bg, p in ((d_gate.sum(0), bgg, pg), (d_up.sum(0), bgu, pu)):
            if bg:
                self._bias_grad(t, rows, cols, sums, bg, p)
        at(dzg, t, rows, cols, cols).copy_(d_gate.to(t))
        at(dzu, t, rows, cols, cols).copy_(d_up.to(t))

    # ---- the rest of the module's surface -----------------------------------------------------------
    def plan_cache_size(self):
        return 0

    def plan_cache_limit(self):
        return 1024

    def build_info(self):
        return {"version": "stand-in", "cuda_archs": "none", "cuda_runtime_compiled": 0, "cublaslt_compiled": "0",
                "cublaslt_runtime": 0, "cuda_driver": 0}


def install(monkeypatch, module=None) -> CudaStandIn:
    """`module` (a new stand-in by default) as fastnn._cuda for one test, and the torch.cuda calls
    the backend makes answered for CPU tensors; the backend's probe results, workspace sizes and
    path counts start empty and are restored afterwards (a GPU run's own stay as they were)."""
    module = module or CudaStandIn()
    monkeypatch.setitem(_native._cuda_state, "module", module)
    monkeypatch.setitem(_native._cuda_state, "error", None)
    monkeypatch.setattr(cb, "_exchange_device", lambda index: 0)
    monkeypatch.setattr(cb, "_maybe_exchange_device", lambda index: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cb, "_current_stream", lambda index: 0)
    monkeypatch.setattr(cb.CudaBackend, "unsupported_reason", lambda self, op, x, weights, act: None)
    monkeypatch.setattr(cb, "_TRUST", {})
    monkeypatch.setattr(cb, "_WORKSPACE_BYTES", {})
    monkeypatch.setattr(cb, "_PATHS", {})
    return module


def route_auto(monkeypatch):
    """Backend "auto" on CPU tensors of float32, bfloat16 or float16 picks the cuda backend (on the
    stand-in install() put in place), and the screen of plain calls, which would send them to the
    cpu backend straight away, lets the general path decide."""
    from fastnn import backends, functional

    def order(device_type, act, dtype=None, _auto_order=backends.auto_order):
        if device_type == "cpu" and dtype in (None, *DTYPES.values()):
            return ["cuda", "torch"]
        return _auto_order(device_type, act, dtype)

    monkeypatch.setattr(backends, "auto_order", order)
    monkeypatch.setattr(functional, "_plain_call", lambda backend, x, weights, biases: None)
