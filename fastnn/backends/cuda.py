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
  one fused kernel dZ = dY * act'(z) with the bias gradient (a deterministic column reduction,
  summed in float32 and rounded once to the dtype: by the kernel itself up to 16 rows, else from
  its per-row-block partial sums, kept in the cuBLASLt workspace, by a second kernel), then
  dX = dZ @ W and dW = dZ^T @ X on cuBLASLt. identity has no dZ pass: its bias gradient is the
  same column sum of dY. dZ and dX go into the memory of what autograd is about to free where it
  fits (`reuse`: the saved z, the MLP block's h and dH; fastnn/autograd.py says when), which lowers
  the peak of a training step by those tensors.
  In the MLP block (fastnn.mlp), relu and gelu_tanh take fc1's act' into fc2's dgrad GEMM
  (DRELU_BGRAD, DGELU_BGRAD epilogues): dH is never stored (hidden_grad).
Saved layouts: the sign mask is cuBLASLt's (rows of relu_aux_ld(N) bits); gelu_tanh's z has rows
of gelu_aux_ld(N) elements (cuBLASLt's aux leading dimension); other activations keep z [M, N].

Trust, then use: before an activation epilogue (RELU*, GELU*) first serves a (device, dtype), one
small probe GEMM with exact inputs (zeros and a NaN row in z) runs it and compares with fastnn's
definition: relu(NaN) = NaN, relu'(0) = 0, the kept z exact, gelu_tanh within the numerics rule
(the dgrad epilogues DRELU_BGRAD and DGELU_BGRAD likewise, on exact dH and z).
An epilogue that disagrees is not used there; fastnn's own kernel runs instead
(`epilogue_trust()` says what was decided). Bias gradients are always fastnn's deterministic
float32 column sums (BGRADB's order is cuBLASLt's, and its 16-bit sums were seen off on an H200).
16-bit forwards pass the bias as cuBLASLt's C matrix rather than to its bias epilogues, which can
add it in the output type (csrc/cuda/lt_gemm.cpp).
`paths()` counts which path served each (op, dtype, activation): `python -m fastnn.info` prints it.
"""
from __future__ import annotations

import collections

import torch

from .. import _native
from .base import Backend, Reusable, empty_like_nothing, tf32_allowed

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# fastnn::cuda::Epilogue codes (csrc/cuda/lt_gemm.h)
(NONE, BIAS, RELU_BIAS, RELU_AUX_BIAS, GELU_BIAS, GELU_AUX_BIAS, DRELU_BGRAD, DGELU_BGRAD, BGRADB, RELU, RELU_AUX, GELU,
 GELU_AUX) = range(13)


EPILOGUE_NAMES = ("DEFAULT", "BIAS", "RELU_BIAS", "RELU_AUX_BIAS", "GELU_BIAS", "GELU_AUX_BIAS", "DRELU_BGRAD",
                  "DGELU_BGRAD", "BGRADB", "RELU", "RELU_AUX", "GELU", "GELU_AUX")

# (op, dtype, activation, path) -> calls; every op call counts itself, so names are formatted only by paths()
_PATHS: dict = {}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _record(op, dtype, act_name, path):
    key = (op, dtype, act_name, path)
    _PATHS[key] = _PATHS.get(key, 0) + 1


def paths() -> dict:
    """{(op, dtype, activation): {path: calls}} for the calls this process made."""
    out: dict = collections.defaultdict(dict)
    for (op, dtype, act_name, path), calls in _PATHS.items():
        out[(op, _dtype_name(dtype), act_name)][path] = calls
    return dict(out)


def reset_paths() -> None:
    _PATHS.clear()


def relu_aux_ld(n: int) -> int:
    """Bits per row of the sign mask (cuBLASLt wants a multiple of 128)."""
    return (n + 127) // 128 * 128


def gelu_aux_ld(n: int) -> int:
    """Elements per row of gelu_tanh's kept pre-activation (cuBLASLt wants a multiple of 8)."""
    return (n + 7) // 8 * 8


# Each op call takes the current stream and a workspace. torch.cuda.current_stream builds a
# torch.cuda.Stream object per call and get_device_capability looks up the device's properties, so:
# the raw handle from the call Inductor's generated code makes per launch (where torch has it), and
# the size once per device. (Host work per call; what it saves has not been timed on a GPU.)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_WORKSPACE_BYTES: dict = {}  # device index -> bytes


def _current_stream(index: int) -> int:
    """The handle (cudaStream_t) of torch's current stream on device `index`."""
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def _workspace(device, index: int) -> torch.Tensor:
    """cuBLASLt workspace from torch's caching allocator (cheap to take per call): 32 MiB from
    Hopper on, 4 MiB before."""
    size = _WORKSPACE_BYTES.get(index)
    if size is None:
        size = _WORKSPACE_BYTES[index] = (32 if torch.cuda.get_device_capability(index)[0] >= 9 else 4) << 20
    return torch.empty(size, dtype=torch.uint8, device=device)


def _empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """t (2-D) with unit column stride (cuBLASLt reads rows with any leading dimension >= cols)."""
    row, col = t.stride()
    if col == 1 and row >= max(1, t.shape[1]):
        return t
    return t.contiguous()


def _ptr(t):
    return 0 if t is None else t.data_ptr()


# The current device during an op call: the two calls torch.cuda.device(...) makes (building that
# object per call cost more than they do: 1.6 us on the Zen 4 EPYC, against a few hundred ns).
_exchange_device = torch.cuda._exchange_device
_maybe_exchange_device = torch.cuda._maybe_exchange_device


class _Call:
    """Device, stream, dtype and workspace of one op call; `with _Call(x) as call:` makes x's device
    the current one for the call, as torch.cuda.device(x.device) does (the epilogue probes ask
    whether its stream is capturing a graph), and restores the previous one."""

    def __init__(self, like: torch.Tensor):
        self.C = _native.cuda_module()
        device = like.device
        self.device = device.index if device.index is not None else torch.cuda.current_device()
        self.stream = _current_stream(self.device)
        self.dtype = _native.DTYPE_CODES[like.dtype]
        self.tf32 = like.dtype == torch.float32 and tf32_allowed()
        self.ws = _workspace(device, self.device)

    def __enter__(self):
        self.previous_device = _exchange_device(self.device)
        return self

    def __exit__(self, *exc):
        _maybe_exchange_device(self.previous_device)
        return False

    def gemm(self, m, n, k, a, lda, trans_a, b, ldb, trans_b, d, ldd, accumulate=False, epilogue=NONE, bias=None,
             bias_grad=None, aux=None, aux_ld=0):
        """Row-major D[m, n] = op(A) @ op(B) (+ D); False when cuBLASLt has no algorithm."""
        return self.C.lt_gemm(self.device, self.stream, self.dtype, self.tf32, m, n, k, a.data_ptr(), lda, trans_a,
                              b.data_ptr(), ldb, trans_b, d.data_ptr(), ldd, accumulate, epilogue, _ptr(bias),
                              _ptr(bias_grad), _ptr(aux), aux_ld, self.ws.data_ptr(), self.ws.numel())

    def bias_grad_scratch(self, m, n, count):
        """Addresses of `count` float32 buffers for the partial column sums of bias gradients over
        m x n (0 where one row block holds every row: the backward kernel then writes the gradient
        itself), and the tensor holding them where they are not in the workspace (keep it until the
        kernel is queued). The workspace serves where it is large enough: the GEMMs that use it next
        run on the same stream, so after the kernels that read the sums."""
        elems = self.C.bias_grad_scratch_elems(m, n)
        if elems == 0:
            return (0,) * count, None
        held = None
        if elems * 4 * count <= self.ws.numel():
            base = self.ws.data_ptr()
        else:
            held = torch.empty(elems * count, dtype=torch.float32, device=self.ws.device)
            base = held.data_ptr()
        return tuple(base + i * elems * 4 for i in range(count)), held

    def act_from_z(self, act, z, ld_z, y, mask=None):
        """y [m, n] = act(z) by fastnn's epilogue kernel, z kept with its bias (row stride ld_z); the
        sign mask into `mask` where given. The forward's pass and the MLP block's rebuild of h both
        run it, so they give the same bits."""
        m, n = y.shape
        self.C.bias_act_forward(self.device, self.stream, self.dtype, act.code, m, n, z.data_ptr(), ld_z, 0,
                                y.data_ptr(), n, _ptr(mask), relu_aux_ld(n))

    def glu_from_z(self, gate_act, z_gate, z_up, y):
        """y [m, n] = act(z_gate) * z_up by fastnn's glu kernel (forward and rebuild alike)."""
        m, n = y.shape
        self.C.glu_forward(self.device, self.stream, self.dtype, gate_act.code, m, n, z_gate.data_ptr(),
                           z_up.data_ptr(), y.data_ptr())

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


# ---- trust in cuBLASLt's activation epilogues ----------------------------------------------------
_TRUST: dict = {}  # (device index, dtype, epilogue) -> bool


def epilogue_trust() -> dict:
    """{(device, dtype, epilogue name): trusted} as the probes decided in this process."""
    return {(dev, _dtype_name(dt), EPILOGUE_NAMES[e]): ok for (dev, dt, e), ok in _TRUST.items()}


def epilogue_agrees(act, dtype, z, y, aux) -> bool:
    """Whether an epilogue's output y (and its aux: the sign mask's bytes or the kept z) matches
    fastnn's definition of act on the exact pre-activation z (float64, NaN where the input was).
    relu must be exact, NaN included (NaN propagates; relu'(0) = 0 and relu'(NaN) = 1, as act.grad says);
    gelu_tanh within the numerics rule against PyTorch's own gelu in the same dtype."""
    ref = act.fn(z)
    y = y.double().cpu()
    if not torch.equal(torch.isnan(y), torch.isnan(ref)):
        return False
    finite = ~torch.isnan(ref)
    if act.name == "relu":
        if not torch.equal(y[finite], ref.to(dtype).double()[finite]):
            return False
    else:
        theirs = act.fn(z.to(dtype)).double()
        e_ours = (y[finite] - ref[finite]).abs().max().item()
        e_theirs = (theirs[finite] - ref[finite]).abs().max().item()
        scale = ref[finite].abs().max().item()
        if not e_ours <= 2 * e_theirs + 2 * torch.finfo(dtype).eps * scale:
            return False
    if aux is None:
        return True
    n = z.shape[1]
    aux = aux.cpu()
    if act.saves == "mask":
        shifts = torch.arange(8, dtype=torch.uint8)
        bits = ((aux.unsqueeze(-1) >> shifts) & 1).reshape(aux.shape[0], -1)[:, :n].bool()
        return torch.equal(bits, act.grad(z) != 0)
    kept = aux[:, :n].double()
    return torch.equal(torch.isnan(kept), torch.isnan(z)) and torch.equal(kept[finite], z.to(dtype).double()[finite])


def _probe(call, act, epilogue, dtype, device) -> bool:
    """Runs `epilogue` on exact inputs: multiples of 1/4 with |x|, |w|, |b| <= 1/2 and K = 16, so
    that every z is a multiple of 1/16 below 5 in magnitude (exact in every dtype, zeros included),
    and row 5 of x holds a NaN; then again with x and b scaled by 2^-10 (z below 0.005, still exact),
    since the rule's tolerance scales with the output and an error that does not shows only on
    small outputs (as the 16-bit bias epilogue's did on an H200: 3e-4 on gelu_tanh outputs near
    0.004, from the bias added in bfloat16; lt_gemm.cpp no longer uses that epilogue there)."""
    m, k, n = 64, 16, 128
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (m, k), generator=gen).double() / 4
    w = torch.randint(-2, 3, (n, k), generator=gen).double() / 4
    b = torch.randint(-2, 3, (n,), generator=gen).double() / 4
    x[5, 0] = float("nan")
    with_bias = EPILOGUE_NAMES[epilogue].endswith("_BIAS")
    for scale in (1.0, 2.0 ** -10):
        z = (x * scale) @ w.t() + (b * scale if with_bias else 0)
        xd, wd, bd = ((t * s).to(dtype=dtype, device=device) for t, s in ((x, scale), (w, 1.0), (b, scale)))
        y = torch.empty((m, n), dtype=dtype, device=device)
        aux, aux_ld = None, 0
        if "AUX" in EPILOGUE_NAMES[epilogue]:
            if act.saves == "mask":
                aux_ld = relu_aux_ld(n)
                aux = torch.empty((m, aux_ld // 8), dtype=torch.uint8, device=device)
            else:
                aux_ld = gelu_aux_ld(n)
                aux = torch.empty((m, aux_ld), dtype=dtype, device=device)
        if not call.gemm(m, n, k, xd, k, False, wd, k, True, y, n, epilogue=epilogue,
                         bias=bd if with_bias else None, aux=aux, aux_ld=aux_ld):
            return False
        if not epilogue_agrees(act, dtype, z, y, aux):
            return False
    return True


def dgrad_epilogue_agrees(act, dtype, dh, z, dz) -> bool:
    """Whether a dgrad epilogue's dZ = dH * act'(z) matches fastnn's definition on exact dH and z
    (float64; z may hold NaN): relu exact (act.grad_times: 0 where z <= 0), gelu_tanh within the
    numerics rule against PyTorch's own gelu backward in the same dtype; NaN and inf (dH and z
    may hold them) where the reference has them."""
    ref = act.grad_times(dh, z)
    dz = dz.double().cpu()
    if not torch.equal(torch.isnan(dz), torch.isnan(ref)) or not torch.equal(torch.isinf(dz), torch.isinf(ref)):
        return False
    if not torch.equal(dz[torch.isinf(ref)], ref[torch.isinf(ref)]):
        return False
    finite = torch.isfinite(ref)
    if act.name == "relu":
        return torch.equal(dz[finite], ref.to(dtype).double()[finite])
    theirs = torch.ops.aten.gelu_backward(dh.to(dtype), z.to(dtype), approximate="tanh").double()
    e_ours = (dz[finite] - ref[finite]).abs().max().item()
    e_theirs = (theirs[finite] - ref[finite]).abs().max().item()
    scale = ref[finite].abs().max().item()
    return e_ours <= 2 * e_theirs + 2 * torch.finfo(dtype).eps * scale


def _probe_dgrad(call, act, epilogue, dtype, device) -> bool:
    """Runs a dgrad epilogue (DRELU_BGRAD, DGELU_BGRAD) once on exact inputs: dH = dY @ W2 with
    multiples of 1/4 and K = 16, z multiples of 1/16 with zeros (and a NaN for gelu_tanh), laid
    out as the forward keeps them; one row of dY is inf (a float16 overflow), which makes that row
    of dH NaN: relu's dZ must be 0 there where z <= 0, as torch's threshold_backward gives."""
    m, k, n = 64, 16, 128
    gen = torch.Generator().manual_seed(0)
    dy = torch.randint(-2, 3, (m, k), generator=gen).double() / 4
    dy[9] = float("inf")
    w2 = torch.randint(-2, 3, (k, n), generator=gen).double() / 4
    z = torch.randint(-40, 41, (m, n), generator=gen).double() / 16
    if act.name == "relu":
        ld = relu_aux_ld(n)
        bits = torch.zeros(m, ld, dtype=torch.uint8)
        bits[:, :n] = (z > 0).to(torch.uint8)
        aux = (bits.reshape(m, -1, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1).to(torch.uint8)
    else:
        z[3, 7] = float("nan")
        ld = gelu_aux_ld(n)
        aux = torch.zeros(m, ld, dtype=dtype)
        aux[:, :n] = z.to(dtype)
    dyd, w2d, auxd = dy.to(dtype=dtype, device=device), w2.to(dtype=dtype, device=device), aux.to(device)
    dz = torch.empty((m, n), dtype=dtype, device=device)
    db = torch.empty(n, dtype=dtype, device=device)
    if not call.gemm(m, n, k, dyd, k, False, w2d, n, False, dz, n, epilogue=epilogue, bias_grad=db, aux=auxd,
                     aux_ld=ld):
        return False
    return dgrad_epilogue_agrees(act, dtype, dy @ w2, z, dz)


def _trusted(call, act, epilogue, dtype, device) -> bool:
    key = (call.device, dtype, epilogue)
    if key not in _TRUST:
        if torch.cuda.is_current_stream_capturing():  # a probe synchronises: not while capturing a graph
            return False
        probe = _probe_dgrad if epilogue in (DRELU_BGRAD, DGELU_BGRAD) else _probe
        _TRUST[key] = probe(call, act, epilogue, dtype, device)
    return _TRUST[key]


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
        if saves == "nothing":
            saved = empty_like_nothing(x)
        else:
            # rows padded for cuBLASLt (gelu_tanh's z past n columns, the mask's bytes past n bits),
            # which its epilogues need but do not write: zeroed, so that the op's output holds no
            # uninitialised bytes (torch.compile, saved-tensor hooks and opcheck see it); model
            # widths, multiples of 128, have none
            padded = shape[1] != (n if saves == "preact" else (n + 7) // 8)
            saved = (torch.zeros if padded else torch.empty)(shape, dtype=dtype, device=x.device)
        if m == 0 or n == 0:
            return y, saved
        with _Call(x) as call:
            if act.name in ("relu", "gelu_tanh", "identity"):
                epilogue = self._lt_epilogue_forward(call, x, weight, bias, act, saves, y, saved)
                if epilogue is not None:
                    _record("linear_act_fwd", x.dtype, act.name, f"cuBLASLt {EPILOGUE_NAMES[epilogue]}")
                    return y, saved
            _record("linear_act_fwd", x.dtype, act.name, "cuBLASLt GEMM + fastnn epilogue kernel")
            # GEMM (+ bias) into z, then fastnn's epilogue kernel
            if saves == "preact":
                z, ld_z = saved, saved.shape[1]
            else:
                z, ld_z = y, n
            call.linear(x, weight, z, ld_z, bias=bias)
            mask = saved if saves == "mask" else None
            if act.name != "identity" or z is not y:
                call.act_from_z(act, z, ld_z, y, mask)
        return y, saved

    @staticmethod
    def _lt_epilogue_forward(call, x, weight, bias, act, saves, y, saved):
        """The whole forward in one cuBLASLt call, where an epilogue exists for it and is trusted:
        the epilogue that served, or None."""
        n = weight.shape[0]
        b = bias is not None
        aux, aux_ld = None, 0
        if act.name == "identity":
            epilogue = BIAS if b else NONE
        elif act.name == "relu" and saves == "mask":
            epilogue, aux, aux_ld = (RELU_AUX_BIAS if b else RELU_AUX), saved, relu_aux_ld(n)
        elif act.name == "relu":
            epilogue = RELU_BIAS if b else RELU
        elif saves == "preact":  # gelu_tanh
            epilogue, aux, aux_ld = (GELU_AUX_BIAS if b else GELU_AUX), saved, gelu_aux_ld(n)
        else:
            epilogue = GELU_BIAS if b else GELU
        if act.name != "identity" and not _trusted(call, act, epilogue, x.dtype, x.device):
            return None
        return epilogue if call.linear(x, weight, y, n, bias=bias, epilogue=epilogue, aux=aux, aux_ld=aux_ld) else None

    def linear_act_bwd(self, dy, x, weight, bias, saved, act, need_dx, need_dw, need_db, reuse=()):
        dy = dy.contiguous()
        m, n = dy.shape
        reusable = Reusable(reuse, _empty)
        with _Call(dy) as call:
            db = None
            if act.saves == "nothing":
                dz = dy
                reusable.discard(dy)
                # the bias gradient is fastnn's deterministic float32 column sum, never BGRADB: on an
                # H200 its float16 sums over 1000 rows came out 8% off (2026-12-04)
                dw = self._wgrad(call, dz, x) if need_dw else None
                if need_db:
                    db = self._bias_grad_only(call, dy, act)
                    _record("linear_act_bwd", dy.dtype, act.name, "fastnn column sum (db)")
            else:
                _record("linear_act_bwd", dy.dtype, act.name, "fastnn act_backward kernel (dZ and db)")
                # (the kernel reads each element of dY and z before it writes that element of dZ)
                dz = reusable.take(dy.shape, dy)
                db = torch.empty(n, dtype=dy.dtype, device=dy.device) if need_db else None
                (partial,), held = call.bias_grad_scratch(m, n, 1) if need_db else ((0,), None)
                z, ld_z, mask = (saved, saved.shape[1], None) if act.saves == "preact" else (None, 0, saved)
                call.C.act_backward(call.device, call.stream, call.dtype, act.code, m, n, dy.data_ptr(), n, _ptr(z), ld_z,
                                    _ptr(mask), relu_aux_ld(n), dz.data_ptr(), n, _ptr(db), partial)
                dw = self._wgrad(call, dz, x) if need_dw else None
            dx = self._dgrad(call, dz, weight, out=reusable.find((m, weight.shape[1]), dz)) if need_dx else None
        return dx, dw, db

    def hidden_grad(self, dy, w2, saved, act, reuse=()):
        """The MLP block's dZ1 = (dY @ W2) * act'(z1) in one cuBLASLt call, with the DRELU_BGRAD
        (relu: the forward's sign mask) or DGELU_BGRAD (gelu_tanh: the kept z) epilogue, where
        trusted and available; None otherwise (the block then runs the GEMM and fastnn's
        act_backward kernel). The epilogue's own bias gradient is not used: db1 comes from fc1's
        backward, by the bias-gradient policy above."""
        epilogue = {"relu": DRELU_BGRAD, "gelu_tanh": DGELU_BGRAD}.get(act.name)
        m, n = dy.shape
        h = w2.shape[1]
        if epilogue is None or m == 0 or h == 0 or n == 0:
            return None
        dy, w2 = dy.contiguous(), _row_major(w2)
        with _Call(dy) as call:
            if not _trusted(call, act, epilogue, dy.dtype, dy.device):
                return None
            # (into h's memory where offered: the GEMM reads dY, W2 and z1 or the mask, not h)
            reusable = Reusable(reuse, _empty)
            reusable.discard(saved)
            dz = reusable.take((m, h), dy)
            db = torch.empty(h, dtype=dy.dtype, device=dy.device)
            ld = relu_aux_ld(h) if act.name == "relu" else gelu_aux_ld(h)
            if not call.gemm(m, h, n, dy, n, False, w2, w2.stride(0), False, dz, h, epilogue=epilogue, bias_grad=db,
                             aux=saved, aux_ld=ld):
                return None
        _record("mlp_hidden_grad", dy.dtype, act.name, f"cuBLASLt {EPILOGUE_NAMES[epilogue]}")
        return dz

    def rebuilds_hidden(self, act, gated):
        # the forward's own kernel over the kept z (the epilogue kernel with no bias to add, the glu
        # kernel), so the same bits; not gelu_tanh, whose forward may be cuBLASLt's GELU_AUX epilogue
        return gated or act.name != "gelu_tanh"

    def act_hidden(self, saved, bias, act):
        # z was kept with its bias (backward_reads_bias is False): nothing to add
        m, n = saved.shape
        h = torch.empty((m, n), dtype=saved.dtype, device=saved.device)
        if m and n:
            _record("act_hidden", saved.dtype, act.name, "fastnn epilogue kernel")
            with _Call(saved) as call:
                call.act_from_z(act, saved, saved.stride(0), h)
        return h

    def glu_hidden(self, z_gate, z_up, gate_bias, up_bias, gate_act):
        m, n = z_gate.shape
        h = torch.empty((m, n), dtype=z_gate.dtype, device=z_gate.device)
        if m and n:
            _record("glu_hidden", z_gate.dtype, gate_act.name, "fastnn glu kernel")
            with _Call(z_gate) as call:
                call.glu_from_z(gate_act, z_gate, z_up, h)
        return h

    @staticmethod
    def _bias_grad_only(call, dy, act):
        m, n = dy.shape
        db = torch.empty(n, dtype=dy.dtype, device=dy.device)
        (partial,), held = call.bias_grad_scratch(m, n, 1)
        call.C.act_backward(call.device, call.stream, call.dtype, 0, m, n, dy.data_ptr(), n, 0, 0, 0, 0, 0, n,
                            db.data_ptr(), partial)
        return db

    @staticmethod
    def _dgrad(call, dz, weight, out=None, accumulate=False):
        """dX[M, K] = dZ[M, N] @ W[N, K], into `out` where given (row-major, sharing no memory with dZ
        or W: cuBLASLt's output must not overlap its inputs), added to what it holds with accumulate."""
        weight = _row_major(weight)
        m, n = dz.shape
        k = weight.shape[1]
        dx = out if out is not None else torch.empty((m, k), dtype=dz.dtype, device=dz.device)
        if m == 0 or k == 0:
            return dx
        if n == 0:
            return dx if accumulate else dx.zero_()
        if not call.gemm(m, k, n, dz, n, False, weight, weight.stride(0), False, dx, k, accumulate=accumulate):
            res = torch.mm(dz, weight)
            dx = dx.add_(res) if accumulate else dx.copy_(res)
        return dx

    @staticmethod
    def _wgrad(call, dz, x):
        """dW[N, K] = dZ^T @ X."""
        x = _row_major(x)
        m, n = dz.shape
        k = x.shape[1]
        dw = torch.empty((n, k), dtype=dz.dtype, device=dz.device)
        if k == 0 or n == 0:
            return dw
        if m == 0:
            return dw.zero_()
        if not call.gemm(n, k, m, dz, n, True, x, x.stride(0), False, dw, k):
            dw.copy_(torch.mm(dz.t(), x))
        return dw

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
            _record("linear_glu_fwd", x.dtype, gate_act.name, "cuBLASLt GEMMs + fastnn glu kernel")
            with _Call(x) as call:
                call.linear(x, gate_weight, z_gate, n, bias=gate_bias)
                call.linear(x, up_weight, z_up, n, bias=up_bias)
                call.glu_from_z(gate_act, z_gate, z_up, y)
        if not save:
            return y, empty_like_nothing(x), empty_like_nothing(x)
        return y, z_gate, z_up

    def linear_glu_bwd(self, dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, gate_act,
                       need_dx, need_dwg, need_dwu, need_dbg, need_dbu, reuse=()):
        dy = dy.contiguous()
        m, n = dy.shape
        _record("linear_glu_bwd", dy.dtype, gate_act.name, "fastnn glu backward kernel + cuBLASLt GEMMs")
        reusable = Reusable(reuse, _empty)
        with _Call(dy) as call:
            # (the kernel reads each element of dY, z_gate and z_up before it writes that element of
            # either dZ)
            dz_gate, dz_up = reusable.take(dy.shape, dy), reusable.take(dy.shape, dy)
            bgg = torch.empty(n, dtype=dy.dtype, device=dy.device) if need_dbg else None
            bgu = torch.empty(n, dtype=dy.dtype, device=dy.device) if need_dbu else None
            (pg, pu), held = call.bias_grad_scratch(m, n, 2) if need_dbg or need_dbu else ((0, 0), None)
            call.C.glu_backward(call.device, call.stream, call.dtype, gate_act.code, m, n, dy.data_ptr(),
                                z_gate.data_ptr(), z_up.data_ptr(), dz_gate.data_ptr(), dz_up.data_ptr(), _ptr(bgg),
                                _ptr(bgu), pg, pu)
            dx = None
            if need_dx:
                dx = self._dgrad(call, dz_gate, gate_weight, out=reusable.find((m, gate_weight.shape[1]), dy))
                dx = self._dgrad(call, dz_up, up_weight, out=dx, accumulate=True)
            dwg = self._wgrad(call, dz_gate, x) if need_dwg else None
            dwu = self._wgrad(call, dz_up, x) if need_dwu else None
        return dx, dwg, dwu, bgg, bgu
