"""The `cpu` backend: GEMMs from torch (MKL / oneDNN), everything around them native (csrc/cpu).

Forward: one GEMM writes the product x @ W^T (with the bias where it costs nothing or the sign
must be exact, see below); one native pass adds the bias (where the GEMM did not) and applies the
activation in float, writing y (and, for relu / leaky_relu, a 1-bit sign mask) while reading the
product once. Backward keeps the GEMM's output itself and adds the bias again in float where the
GEMM left it out, so forward writes nothing but y. Backward: one native pass forms
dZ = dY * act'(Z) and the bias gradient (column sums of the unrounded dZ, in double for float32
with groups of 8 rows added in float first), then two GEMMs give dX = dZ @ W and dW = dZ^T @ X.

Where the bias goes. In float64, and in float32 where addmm costs no more than mm (the AMD EPYCs
measured), the GEMM adds it, so Z is bit for bit what F.linear computes. On Intel's CPUs MKL's
float32 addmm costs 1-11% more than mm (see f32_bias_in_pass), so there the pass that reads the
product anyway adds the bias for the smooth activations and the up projections: Z = fl(acc + b),
the numerics rule's, but not F.linear's bits. In bfloat16
and float16 torch's GEMM rounds its product to 16 bits and addmm's bias costs an extra pass over
the output (1.03-1.28x mm), so the native pass adds the bias in float instead: Z = round(x W^T) + b
is never rounded again, which the smooth activations absorb within the error rule. The kinked ones
(relu, leaky_relu, the relu gate of reglu) cannot: rounding the product before adding the bias can
flip the sign of a Z near zero and with it a whole gradient element, so for them the GEMM adds the
bias and Z's sign is exactly PyTorch's, in a forward that saves nothing too (so that no output
depends on whether there is a gradient to give). That GEMM is oneDNN's linear
(torch.ops.mkldnn._linear_pointwise) where a probe finds it bit for bit addmm: it costs what mm
does. (Not for the smooth activations: at a few hundred rows it costs 1-3% more than mm plus the
pass, about 10 us more per call and a slower kernel, and no less above that.)

16-bit GEMMs on CPUs without native 16-bit matrix instructions. torch multiplies bfloat16 and
float16 with oneDNN only where the CPU has AVX512-BF16 / AVX512-FP16 or AMX; elsewhere (AVX2-only
x86, for one) it falls back to a reference loop 40-80x slower than its own float32 GEMM. There the
cpu backend multiplies in float32: exact conversions in, float32 accumulation, one rounding out (the
numerics rule), and it folds the bias into that GEMM, as float32 does where addmm costs what mm does.
FASTNN_CPU_GEMM16=native|float32, read at import, overrides the choice (tests run both).

What this backend does for speed that eager PyTorch does not:
- up to TRANSPOSED_PRODUCT_MAX_ROWS rows (float32 GEMMs on AMD CPUs from 2 rows, 16-bit ones on oneDNN's AMX kernels;
  bfloat16 without AMX at 16-64 rows, see _bf16_transposed_without_amx), the forward GEMMs compute
  Z^T = W x^T, which MKL and oneDNN run faster at few rows, and the pass after them reads Z^T and
  writes y row-major;
- backward writes dZ into memory it is handed (`reuse`: the saved pre-activation once autograd frees
  it, see fastnn/autograd.py) instead of a fresh tensor, whose first touch costs a page fault per
  4 KiB once it is too large for malloc to recycle;
- bfloat16 weight-gradient GEMMs dW = dZ^T X on CPUs with AMX get dZ^T as a row-major copy (a
  native transpose) rather than the transposed view, which oneDNN multiplies 1.3-2.3x slower
  (wgrad_from_copy);
- the large buffers it allocates itself (products, outputs, gradients: `_empty`) ask Linux for
  transparent huge pages, where the kernel gives them on request ("madvise" mode, the common
  default): a fresh 90 MB buffer then takes 45 page faults instead of 22 000; not in a VM that
  hands free memory back to its host (huge_pages_off_reason).
FASTNN_CPU_HUGEPAGES=0 turns that off, =1 asks in such a VM too.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import threading

import torch

from .. import _native
from .base import Backend, Reusable, empty_like_nothing

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


_HALF = (torch.bfloat16, torch.float16)
_FLOAT = (torch.float32, torch.float64)  # F.linear's orientation, the bias where _fold_bias says


@functools.lru_cache(maxsize=None)
def _onednn_has(dtype) -> bool:
    """Whether torch's own CPU GEMM for a 16-bit dtype runs on oneDNN's native kernels here."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):  # a torch without the probe: trust its GEMM
        return True


def _env_choice(name, choices):
    value = os.environ.get(name, "")
    return value if value in choices else None


# The overrides below are read once, at import: a lookup in os.environ on every call cost tens of
# microseconds right after a large GEMM, when Python's own data has left the caches (tests set
# these attributes instead).
GEMM16_OVERRIDE = _env_choice("FASTNN_CPU_GEMM16", ("native", "float32"))
PRODUCT_OVERRIDE = _env_choice("FASTNN_CPU_PRODUCT", ("direct", "transposed"))


def gemm_in_float32(dtype) -> bool:
    """Whether this backend runs a `dtype` GEMM in float32 (see the module docstring)."""
    if dtype not in _HALF:
        return False
    if GEMM16_OVERRIDE is not None:
        return GEMM16_OVERRIDE == "float32"
    return not _onednn_has(dtype)


# Below this many rows the forward GEMMs (linear_act's, linear_glu's two) compute Z^T = W x^T (+ b)
# (not float32 GEMMs on Intel CPUs, see product_transposed):
# MKL's float32 GEMM on the AVX2 AMD EPYC this was measured on (2 threads) runs it 1.1-1.3x faster
# at 256 rows, 1.2-1.8x at 64 and 1.5-2.1x at 16 than Z = x W^T (the orientation F.linear asks for),
# for (in, out) = (768, 3072), (3072, 768), (1024, 4096), (256, 1024), (4096, 11008); 1.03-1.16x
# at 512 and 0.97-1.06x from 1024 rows on. The pass after the GEMM reads Z^T and writes y row-major.
TRANSPOSED_PRODUCT_MAX_ROWS = 512


@functools.lru_cache(maxsize=None)
def _intel_cpu() -> bool:
    """Whether this is an Intel CPU (Linux: /proc/cpuinfo; elsewhere assumed not)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return False


@functools.lru_cache(maxsize=None)
def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch >= 2.4
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def _column_major(weight) -> bool:
    """Whether a 2-D weight (out, in) is stored column by column: the transposed view of an (in, out)
    matrix, as transformers' Conv1D weights (GPT-2) are read."""
    return weight.dim() == 2 and weight.shape[0] > 1 and weight.stride(0) == 1 and weight.stride(1) >= weight.shape[0]


def product_transposed(rows, dtype, fold_bias, weights=()) -> bool:
    """Whether the forward GEMMs multiply in the transposed orientation (see above): for float32
    GEMMs (which 16-bit inputs get too where torch's own 16-bit GEMM is the slow loop) on CPUs
    other than Intel's, and for 16-bit GEMMs on CPUs with AMX, where oneDNN multiplies W x^T faster
    too (bfloat16, Xeon with AMX, 2 threads: 1.78x at 256 x 768 -> 3072, 1.53x at 64 rows, 1.08x at
    256 x 3072 -> 768, 1.13x at 512 x 1024 -> 4096), and for bfloat16 without AMX at the few row
    counts and weight sizes where it pays (_bf16_transposed_without_amx, below), but only where the
    pass adds the bias (fold_bias False): a GEMM that adds it keeps F.linear's orientation, whose
    bits the kinked activations' sign follows. On Intel's CPUs MKL's float32 GEMM gains nothing
    from the transposed orientation that the pass from Z^T does not give back (Xeon with AMX, gelu
    forward, paired: 0.92-0.95x of the direct orientation at 64, 128, 512 rows and 256 x 3072 ->
    768, 1.00x at 256 x 768 -> 3072). Nor for a column-major weight (weights: the call's; _column_major): x W^T is then a
    product of two row-major matrices, which oneDNN runs faster than W x^T with W column-major
    (bfloat16, Xeon with AMX, 2 threads, a 3072 x 768 Conv1D weight read transposed: identity at
    256 rows 0.68 against 0.92 ms, at 16 rows 0.32 against 0.38; gelu_tanh 0.72 / 0.94, 0.33 / 0.39).
    FASTNN_CPU_PRODUCT=direct|transposed, read at import, overrides the choice (tests run both)."""
    if PRODUCT_OVERRIDE is not None:
        return PRODUCT_OVERRIDE == "transposed"
    if rows > TRANSPOSED_PRODUCT_MAX_ROWS or any(_column_major(w) for w in weights):
        return False
    if dtype == torch.float32 or gemm_in_float32(dtype):
        # (not one row: W x^T is then the same GEMV as x W^T and Z^T the same memory as Z, so the
        # pass from Z^T and the general path only cost more: float32 gelu forward on the Zen 4 EPYC,
        # 2 threads, the benchmark's paired rounds, 0.67x eager at 1 x 64 -> 256, 0.92x at
        # 1 x 768 -> 3072 and 0.90x at 1 x 3072 -> 768 transposed, 1.09x, 1.04x and 1.00x direct)
        return not _intel_cpu() and rows > 1
    if dtype not in _HALF or fold_bias:
        return False
    return _has_amx() or (dtype == torch.bfloat16 and _bf16_transposed_without_amx(rows, weights))


# bfloat16 on oneDNN's AVX512-BF16 kernels without AMX (the AMD EPYCs) at few rows: W x^T ran faster
# than x W^T (bit for bit the same product) at 16, 32, 48 and 64 rows, for weights of 2^19 elements
# (1 MiB) or more, unless in_features is a power of two from 1024 (W's rows 2 KiB, 4 KiB, ... apart).
# GEMM alone, AMD EPYC Zen 4, 2 threads: at 16 rows 1.16-1.47x faster for in_features 640-896, 1536,
# 2560, 3072, 5120, 11008 (out 768-11008), at 32-64 rows 1.04-1.37x; but 0.54-0.92x with 1024, 2048
# or 4096 in_features at 16 rows (4096 at 32-64 too). linear_act's gelu forward, its pass from Z^T
# included: 0.62-0.90x at 2-8 rows, 0.91-0.95x at 20, 40 and 56 rows, 0.97x at 256; and for smaller
# weights 0.79-0.98x at 16-64 rows (768 -> 32 / 64 / 256, 3072 -> 128, 96 -> 384, 640 -> 640),
# 1.00-1.02x for 768 -> 512, 1.01-1.17x from 768 -> 768 and 3072 -> 256 up. The BERT-base MLP block
# (768 -> 3072 -> 768, gelu) ran 1.09-1.17x faster so at 16-64 tokens without a gradient and
# 0.99-1.08x with one (transformers' MLPs fused at 16 tokens: record
# ...-zen4-2threads-fused-models-16-tokens-bf16-transposed-at-6b10ef5.txt).
BF16_TRANSPOSED_ROWS_WITHOUT_AMX = (16, 32, 48, 64)
BF16_TRANSPOSED_MIN_WEIGHT_ELEMENTS = 1 << 19


def _bf16_transposed_without_amx(rows, weights) -> bool:
    if rows not in BF16_TRANSPOSED_ROWS_WITHOUT_AMX or not weights:
        return False
    n, k = weights[0].shape
    # (k a power of two: W's rows 2 KiB, 4 KiB, ... apart)
    return n * k >= BF16_TRANSPOSED_MIN_WEIGHT_ELEMENTS and (k < 1024 or k & (k - 1) != 0)


# Backward's weight-gradient GEMM dW = dZ^T X: oneDNN's bfloat16 GEMMs run it far faster with dZ^T as
# a row-major matrix than as the transposed view dZ.t() (the layout eager PyTorch's linear backward
# hands them): bfloat16, Xeon with AMX, 2 threads, the GEMM alone 1.3-2.3x (2048 x 768 -> 3072: 13.9
# against 6.1 ms; 8192 x 256 -> 1024: 7.0 / 3.5). The cpu backend copies dZ^T with a native transpose
# (csrc/cpu, cpu_transpose) that costs about a plain copy of dZ (3.1 ms at 2048 x 3072 from memory),
# so the copy pays where the GEMM is long per element of dZ, i.e. with many input features: gelu
# forward+backward 1.14-1.28x faster at 256 x 768 -> 3072, 2048 x 768 -> 3072, 2048 x 3072 -> 768,
# 4096 x 1024 -> 4096, 8192 x 512 -> 2048 and 64 x 4096 -> 11008, the BERT-base MLP block 1.18-1.38x
# (paired runs in one process), but 1.03-1.09x slower at 8192 x 256 -> 1024. Writing dZ^T from the
# act' pass itself, each block while in the caches, measured no faster (0.96-1.07x of the separate
# transpose) and was dropped. MKL's float32 GEMM gained nothing from the copy (2048 x 768 -> 3072,
# 256 x 768 -> 3072) or lost (8192 x 256 -> 1024: 1.06x), nor did float16 on that Xeon (no AMX-FP16:
# the GEMM alone 43.6 ms either way at 2048 x 768 -> 3072). Nor bfloat16 on oneDNN's AVX512-BF16 kernels
# without AMX (AMD EPYC Zen 5): the GEMMs alone run 5% faster from the copies there, but the BERT-base
# MLP block ran 0.99x (gelu) and 0.90x (swiglu) as fast with them (paired, 2 threads).
WGRAD_COPY_MIN_IN_FEATURES = 512
WGRAD_OVERRIDE = _env_choice("FASTNN_CPU_WGRAD", ("view", "copy"))


def wgrad_from_copy(dtype, in_features) -> bool:
    """Whether the weight-gradient GEMM reads dZ^T from a row-major copy (see above) rather than the
    view dZ.t(): for oneDNN's bfloat16 GEMMs on CPUs with AMX (where it was measured), with at least
    WGRAD_COPY_MIN_IN_FEATURES input features; not for bfloat16 multiplied in float32, nor float16,
    float32 or float64 (measured no faster).
    FASTNN_CPU_WGRAD=view|copy, read at import, overrides the choice (tests run both)."""
    if WGRAD_OVERRIDE is not None:
        return WGRAD_OVERRIDE == "copy"
    return (dtype == torch.bfloat16 and not gemm_in_float32(dtype) and _has_amx()
            and in_features >= WGRAD_COPY_MIN_IN_FEATURES)


def _wgrad(dz, x):
    """dW = dZ^T X, dZ^T from a row-major copy where wgrad_from_copy, else the view dZ.t()."""
    return _mm([(_wgrad_lhs(dz, x.shape[1]), x)])


def _wgrad_lhs(dz, in_features):
    rows, cols = dz.shape
    # The transpose streams its output, fast where the copy's rows fill whole 64-byte lines: at other
    # row counts lines shared by two rows made it 3-6x slower (bfloat16 x 3072: 2040 or 2047 rows 6.8 ms
    # against 2048 rows' 2.5-4.2, 264 rows 0.81 against 256 rows' 0.14), as slow as the view's GEMM.
    # (Padding the copy's rows instead is unsafe: torch's bfloat16 mm read the padding of a row-major
    # A with lda > K, 100 x 700 -> 64 on the Xeon, and returned NaNs.)
    if (not wgrad_from_copy(dz.dtype, in_features) or dz.stride(1) != 1 or rows * cols == 0
            or rows * dz.element_size() % 64):
        return dz.t()
    out = _empty((cols, rows), dz.dtype, dz.device)
    _native.cpu_module().cpu_transpose(_native.DTYPE_CODES[dz.dtype], rows, cols, dz.data_ptr(), dz.stride(0),
                                       out.data_ptr(), rows, _native.num_threads())
    return out


def torch_gemm_is_slow(dtype) -> bool:
    """Whether torch's own CPU GEMM in `dtype` is the slow reference loop on this CPU (what eager
    PyTorch runs; the benchmark leaves such dtypes out of its default set)."""
    return dtype in _HALF and not _onednn_has(dtype)


def _rounded(t, dtype):
    """t in dtype (.to is a dispatcher call even when it has nothing to do)."""
    return t if t.dtype == dtype else t.to(dtype)


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


_BALLOON_DEVICES = "/sys/bus/virtio/drivers/virtio_balloon"
_VIRTIO_BALLOON_F_REPORTING = 5


def free_page_reporting(devices=_BALLOON_DEVICES) -> bool:
    """Whether a virtio balloon here negotiated free page reporting: the guest hands free blocks of
    2 MiB and up back to its host, and a huge page is such a block, so its first touch faults on the
    host too once reported. Measured in such a VM (AMD EPYC Zen 4, record
    2026-12-05-cpu-amd-epyc-zen4-hugepages-first-touch.txt): a fresh advised 64 MB buffer took
    67-83 ms cold and 4-10 ms warm, against 13-16 ms in 4 KiB pages; in the benchmark's default set
    the advice gave 1.32-1.74x eager at 8192 x 256 -> 1024 but spread the 4096 x 1024 -> 4096 rows
    below eager (IQRs from 0.89x, one median 0.89x), where without it every row was 1.00-1.26x with
    IQRs from 0.99x (record 2026-12-05-...-hugepages-default-set-ab.txt)."""
    try:
        names = [n for n in os.listdir(devices) if n.startswith("virtio")]
    except OSError:
        return False
    for name in names:
        try:
            with open(os.path.join(devices, name, "features")) as f:
                bits = f.read().strip()  # one character per feature bit, bit 0 first
        except OSError:
            continue
        if len(bits) > _VIRTIO_BALLOON_F_REPORTING and bits[_VIRTIO_BALLOON_F_REPORTING] == "1":
            return True
    return False


def huge_pages_off_reason():
    """Why the large buffers do not ask for huge pages here, or None where they do: Linux with
    transparent huge pages in "madvise" mode ("always" gives them to every large mapping already,
    "never" to none), outside a VM that reports free pages to its host (free_page_reporting) unless
    FASTNN_CPU_HUGEPAGES=1 asks anyway."""
    setting = os.environ.get("FASTNN_CPU_HUGEPAGES", "").strip()
    if setting == "0":
        return "off (FASTNN_CPU_HUGEPAGES=0)"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().strip()
    except OSError:
        return "not asked for: no transparent huge pages here"
    if "[madvise]" not in mode:
        return f"not asked for: transparent huge pages here are {mode}"
    if setting != "1" and free_page_reporting():
        return ("not asked for: this VM hands free 2 MiB blocks back to its host (virtio-balloon free page "
                "reporting), so a huge page's first touch often faults on the host too "
                "(FASTNN_CPU_HUGEPAGES=1 asks anyway)")
    return None


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise where asking for huge pages changes something (huge_pages_off_reason)."""
    if huge_pages_off_reason() is not None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _env_mib(name, default):
    """Bytes from an environment variable in MiB (the default where it is unset or not a number)."""
    try:
        return int(float(os.environ.get(name, default)) * (1 << 20))
    except ValueError:
        return int(default * (1 << 20))


class BufferCache:
    """The large buffers `_empty` made, handed out again once nothing else holds them.

    A training step allocates buffers of the same sizes step after step (products, hidden states,
    gradients), and a fresh buffer past malloc's mmap threshold costs a page fault per 4 KiB on its
    first write, in the GEMM or pass that writes it. Gelu, fastnn's own times in the benchmark
    without / with the cache (Xeon with AMX, 2 threads, two runs each, record
    2026-12-05-...-buffer-cache-default-set-ab-at-b053fe5.txt): 8192 x 256 -> 1024 float32 forward
    20.3-21.4 / 13.5-14.3 ms, forward+backward 57.3-58.2 / 43.9-46.8; 4096 x 1024 -> 4096 bfloat16
    forward+backward 85.9-90.8 / 59.7-61.6, float32 forward 102.7-108.0 / 86.8-93.1; but bfloat16
    forward 15.9-16.9 / 19.5-20.3 (28.4-30.7 / 19.0-19.1 in an earlier pair: that VM's first-touch
    cost swings from run to run, and a page the kernel has just zeroed is warm).

    A buffer is free when the cache holds the only reference to its storage (views, autograd's
    saved tensors, .grad, numpy arrays all count), checked and claimed under a lock, so nothing is
    ever handed out twice. It goes out as a new tensor on that storage (not a view: autograd treats
    views apart) and only for the same number of bytes, so that a tensor's storage is never larger
    than the tensor. Whenever a new buffer is made, free buffers beyond `limit_bytes`
    (FASTNN_CPU_BUFFER_CACHE_MB, read at import, default 1024; 0 turns the cache off) are let go;
    `clear()` lets go of every free one."""

    # 4 MiB and up. glibc's malloc maps and unmaps chunks past its mmap threshold (up to 32 MiB) and
    # gives the top of its heap back to the kernel once more than twice that is free there, so in a
    # loop that runs alone, as training does, buffers of a few MiB can come back fresh step after
    # step: 8192 x 256 -> 1024 bfloat16 gelu forward+backward took 20.5-24.4 ms with 3600-6000 page
    # faults a step kept from 32 MiB, 17.5 ms and none kept from 4 MiB (eager 22.3-30.4 ms with
    # 5000-8600); the float32 16 x 768 -> 3072 -> 768 MLP block (9 MiB weight gradients) 4.7 ms
    # against 4.2-4.5; the rest of the default set and the BERT-base block no change beyond noise
    # (AMD EPYC Zen 5, 2 threads, benchmarks/steady_state.py, two runs; record
    # 2026-12-06-...-buffer-cache-4mib-alone-ab.txt). Interleaved with eager's calls in one process
    # (the benchmark) malloc can instead hand fastnn the chunk eager freed just before: kept from
    # 4 MiB, 8192 x 256 -> 1024 bfloat16 forward took 3.74-3.81 ms there against 2.98-3.14 (Xeon with
    # AMX, 2 threads). Smaller buffers are left to malloc (kept from 1 MiB, 256 x 768 -> 3072
    # bfloat16 forward+backward ran 0.91-0.99x eager against 1.02-1.03x in the benchmark on that Xeon).
    # (FASTNN_CPU_BUFFER_CACHE_MIN_MB, read at import, sets it: a process whose malloc keeps its memory,
    # jemalloc or tcmalloc, may want it higher)
    MIN_BYTES = _env_mib("FASTNN_CPU_BUFFER_CACHE_MIN_MB", 4)

    def __init__(self, limit_bytes):
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._held = {}  # bytes -> flat uint8 tensors on the buffers' storages, the one handed out last last
        self._alone = _alone_test()

    def _on(self, nbytes):
        return self._alone is not None and self.limit_bytes > 0 and nbytes >= self.MIN_BYTES

    def _free(self, flat):
        # (a storage shared with another process, share_memory_, is left to that protocol)
        return self._alone(flat) and not flat.untyped_storage().is_shared()

    def take(self, shape, dtype):
        """A free buffer of shape and dtype's size as a new tensor, or None."""
        nbytes = dtype.itemsize * math.prod(shape)
        if not self._on(nbytes):
            return None
        with self._lock:
            same_size = self._held.get(nbytes, [])
            # the one handed out last first, as malloc gives the chunk freed last: its lines are the
            # likeliest to be in the caches still
            for i in range(len(same_size) - 1, -1, -1):
                flat = same_size[i]
                # (a storage resized since holds other bytes: not to be handed out as this size)
                if self._free(flat) and flat.untyped_storage().nbytes() == nbytes:
                    same_size.append(same_size.pop(i))
                    return torch.empty(0, dtype=dtype, device="cpu").set_(flat.untyped_storage(), 0, tuple(shape))
        return None

    def keep(self, t):
        """Hold t's storage (a buffer `_empty` just made) to hand out again once free; let go of
        free buffers beyond the limit."""
        nbytes = t.untyped_storage().nbytes()
        if not self._on(nbytes):
            return
        with self._lock:
            self._held.setdefault(nbytes, []).append(
                torch.empty(0, dtype=torch.uint8, device="cpu").set_(t.untyped_storage()))
            alone = [(flat, size) for size, flats in self._held.items() for flat in flats if self._alone(flat)]
            # shared ones nothing here holds any more go; then free ones past the limit, sizes in the
            # order first made, each size's longest-held first
            let_go = {id(flat) for flat, _ in alone if flat.untyped_storage().is_shared()}
            free = [(flat, size) for flat, size in alone if id(flat) not in let_go]
            free_bytes = sum(size for _, size in free)
            for flat, size in free:
                if free_bytes <= self.limit_bytes:
                    break
                let_go.add(id(flat))
                free_bytes -= size
            if let_go:
                self._held = {size: [flat for flat in flats if id(flat) not in let_go]
                              for size, flats in self._held.items()}

    def clear(self):
        """Let go of every free buffer."""
        with self._lock:
            self._held = {size: [flat for flat in flats if not self._free(flat)] for size, flats in self._held.items()}

    def held_bytes(self):
        """(bytes held in all, bytes of them free)."""
        with self._lock:
            sizes = [(size, self._free(flat)) for size, flats in self._held.items() for flat in flats]
        return sum(n for n, _ in sizes), sum(n for n, free in sizes if free)


def _alone_test():
    """A test of whether a tensor is all that holds its storage, from torch's count of the
    storage's references (torch._C._storage_Use_Count) and Python's of the storage object's, as a
    lone tensor shows them: torch keeps one Python object per storage, which counts once in the
    storage's references, so a Python reference to it is a holder too. Checked here against a view,
    a second storage object and a numpy array; None where any check fails (nothing is then
    cached)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None

    def references(t):
        storage = t.untyped_storage()
        return use_count(storage._cdata), sys.getrefcount(storage)

    try:
        t = torch.empty(4)  # in the cache's place
        lone = references(t)

        def alone(t):
            return references(t) == lone

        seen = [alone(t)]
        for make in (lambda: t[1:], t.untyped_storage, t.numpy):
            other = make()
            seen.append(alone(t))
            del other
            seen.append(alone(t))
    except (AttributeError, RuntimeError, TypeError):
        return None
    return alone if seen == [True, False, True, False, True, False, True] else None


BUFFER_CACHE = BufferCache(_env_mib("FASTNN_CPU_BUFFER_CACHE_MB", 1024))


def _empty(shape, dtype, device):
    """A free buffer of BUFFER_CACHE, else torch.empty (kept there), with the 2 MiB-aligned part of
    a large CPU buffer advised to huge pages before anything touches it. A fresh buffer past malloc's
    mmap threshold costs a page fault per 4 KiB on its first write: bfloat16 dW of 16x4096 -> 11008
    (90 MB) took 61 ms in torch.mm, 30 ms with huge pages (Xeon with AMX, 2 threads); eager PyTorch
    pays the 4 KiB faults. The advice changes no value; a failed call leaves the buffer as it was."""
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes < 2 * _HUGE_PAGE and nbytes < BUFFER_CACHE.MIN_BYTES:
        # (neither advised nor cached: torch.empty straight away, the common small-call case, where the
        # checks below cost about as much as the allocation)
        return torch.empty(shape, dtype=dtype, device=device)
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        t = BUFFER_CACHE.take(shape, dtype)
        if t is not None:
            return t
    t = torch.empty(shape, dtype=dtype, device=device)
    if nbytes >= 2 * _HUGE_PAGE and on_cpu:
        advise = _madvise()
        if advise is not None:
            start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
            end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
            if end > start:
                advise(start, end - start, _MADV_HUGEPAGE)
    if on_cpu:
        BUFFER_CACHE.keep(t)
    return t


def _unpadded(a):
    """a, copied where it is a 16-bit row-major view whose rows lie further apart than their length
    (x[:, :k] of a wider tensor): torch 2.13's bfloat16 mm on a Xeon with AMX reads the elements
    between such rows, and NaN or inf there came out as NaN in the product (F.linear too)."""
    if a.dim() == 2 and a.stride(1) == 1 and a.stride(0) > a.shape[1] and a.shape[0] > 1:
        return a.contiguous()
    return a


# Not oneDNN's float32 inner product (torch.ops.mkldnn._linear_pointwise), though on the AMD EPYC
# Zen 4 measured (2 threads, two rounds of five of the benchmark's shapes) it ran x W^T 0.86-1.47x
# (above 1.08x in nine of ten) and dZ W 1.09-1.8x as fast as torch's (MKL's) float32 GEMM, and
# fastnn's float32 gelu forward 1.24-1.34x eager with it: it sums the inner dimension less
# accurately, its largest error 1.3-1.9x MKL's at K = 256-384, 1.9-2.7x at 512-1024, 2.7-4.1x at
# 1536-3072 (the same at K <= 128), and the benchmark's error check put the input gradient at
# 256 x 768 -> 3072 outside the numerics rule (2026-12-04).
def _mm(pairs, bias=None, out=None):
    """sum of a @ b over pairs (+ bias), in the inputs' dtype, rounded once; written into `out`
    where one is given and the GEMM runs in the inputs' dtype, else into `_empty` memory."""
    dtype = pairs[0][0].dtype
    if gemm_in_float32(dtype):
        pairs = [(a.float(), b.float()) for a, b in pairs]
        bias = None if bias is None else bias.float()
        out = None
    else:
        if out is None:
            out = _empty((pairs[0][0].shape[0], pairs[0][1].shape[1]), dtype, pairs[0][0].device)
        if dtype in _HALF:
            pairs = [(_unpadded(a), b) for a, b in pairs]
    result = None
    for a, b in pairs:
        if result is None:
            result = torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
        else:
            result.addmm_(a, b)
    return _rounded(result, dtype)


@functools.lru_cache(maxsize=None)
def _onednn_linear_exact(dtype) -> bool:
    """Whether oneDNN's linear serves `dtype` here and gives addmm's (F.linear's) bits: checked once
    on a few shapes, a long inner dimension among them. It needs a contiguous bias (a strided one
    gave wrong sums in torch 2.13) and at least one input feature."""
    if dtype not in _HALF or not _onednn_has(dtype):
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        # (whatever the first call runs under: an autocast region would cast addmm's inputs)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for m, k, n in ((37, 24, 40), (3, 3000, 17), (1, 1, 1)):
                x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((m, k), (n, k), (n,)))
                if not torch.equal(op(x, w, b, "none", [], ""), torch.addmm(b, x, w.t())):
                    return False
        return True
    except (AttributeError, RuntimeError):  # a torch built without oneDNN, or without the op
        return False


@functools.lru_cache(maxsize=None)
def _one_row_by_mv(dtype) -> bool:
    """Whether one row's GEMM runs as torch.mv / addmv: for bfloat16 on oneDNN's AMX kernels, whose
    one-row GEMM runs far slower than mv (Xeon with AMX, 2 threads: 768 -> 3072 mm 358 us, mv 224;
    4096 -> 11008 5.9 ms against 3.8; F.linear runs the one-row GEMM, oneDNN's linear slower still),
    where a probe finds mv and addmv give mm's and addmm's (F.linear's) bits: on a few shapes, a long
    inner dimension among them. (Not addmv with one input feature: torch 2.13's rounds the product
    before it adds the bias there.)"""
    if dtype != torch.bfloat16 or gemm_in_float32(dtype) or not _has_amx():
        return False
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for k, n in ((24, 40), (3000, 17), (2, 3), (1, 5), (768, 3072)):
            x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((1, k), (n, k), (n,)))
            if not torch.equal(torch.mv(w, x[0]), torch.mm(x, w.t())[0]):
                return False
            if k > 1 and not torch.equal(torch.addmv(b, w, x[0]), torch.addmm(b, x, w.t())[0]):
                return False
    return True


# On Intel's CPUs MKL's float32 addmm costs more than mm: it writes the bias into the output
# before the GEMM and reads it back (Xeon with AMX, 2 threads, paired, addmm / mm: 1.04x at
# 256 x 768 -> 3072, 1.05x at 2048 x 768 -> 3072, 1.01x at 2048 x 3072 -> 768, 1.11x at
# 8192 x 256 -> 1024, 1.03x at 4096 x 1024 -> 4096). A pass that reads the product anyway adds the
# bias for nothing, so there the smooth activations and the up projections take it in the pass
# (paired, against the bias in the GEMM: gelu forward 1.03x faster at 256 x 768 -> 3072 and
# 8192 x 256 -> 1024, swiglu 1.03x, forward+backward 1.01-1.03x). The identity has no pass (fc2 of
# the MLP block) and relu's sign must be F.linear's: their GEMM adds it.
# FASTNN_CPU_F32_BIAS=gemm|pass, read at import, overrides the choice (tests run both).
F32_BIAS_OVERRIDE = _env_choice("FASTNN_CPU_F32_BIAS", ("gemm", "pass"))


def f32_bias_in_pass() -> bool:
    """Whether float32's smooth activations and up projections add the bias in the pass (above)."""
    if F32_BIAS_OVERRIDE is not None:
        return F32_BIAS_OVERRIDE == "pass"
    return _intel_cpu()


def _fold_bias(dtype, act):
    """Whether the GEMM adds the bias (see the module docstring). act is None for an up projection,
    whose sign nothing reads. A forward that saves nothing folds it as one that saves: its output is
    then bit for bit the same with or without a gradient to give (reentrant checkpointing compares
    a no_grad forward with its recomputation; eager PyTorch gives the same bits either way)."""
    if act is not None and act.saves != "preact":  # relu's sign, or no pass (the identity)
        return act.saves == "mask" or dtype in _FLOAT or gemm_in_float32(dtype)
    if dtype == torch.float32:
        return not f32_bias_in_pass()
    return dtype == torch.float64 or gemm_in_float32(dtype)


def _bias_to_add(bias, dtype, act):
    """The bias the GEMM product kept for backward still lacks: None where the GEMM added it."""
    return None if bias is None or _fold_bias(dtype, act) else bias.contiguous()


def _gemm(x, weight, bias, fold_bias):
    """x @ W^T, plus the bias when fold_bias; returns (product, bias still to add)."""
    if bias is not None and fold_bias:
        if x.shape[0] == 1 and x.shape[1] > 1 and _one_row_by_mv(x.dtype):
            return torch.addmv(bias, _unpadded(weight), x[0]).unsqueeze(0), None
        if (not gemm_in_float32(x.dtype) and _onednn_linear_exact(x.dtype) and x.shape[1] > 0
                and x.is_contiguous() and weight.is_contiguous()):
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias.contiguous(), "none", [], ""), None
        return _mm([(x, weight.t())], bias), None
    return _mm([(x, weight.t())]), (None if bias is None else bias.contiguous())


def _transposed_out(x, cols):
    """Memory for Z^T ([cols, rows]) whose rows are not a multiple of 128 bytes apart: the pass
    after the GEMM reads one 64-byte line from each of hundreds of its rows at a time, and rows a
    multiple of 1 KiB apart all fall in 4 of the L1 cache's 64 sets (a float32 256x3072 identity
    pass from Z^T ran 10-15% faster with each row padded by a line, Xeon with AMX, 2 threads)."""
    rows, size = x.shape[0], x.element_size()
    pad = 64 // size if rows * size % 128 == 0 else 0
    return _empty((cols, rows + pad), x.dtype, x.device)[:, :rows]


def _gemm_transposed(x, weight, bias, fold_bias):
    """Z^T = W x^T (see TRANSPOSED_PRODUCT_MAX_ROWS), plus the bias as a column when fold_bias;
    returns (product, bias still to add). The product's rows may be padded (its stride(0)); a GEMM
    run in float32 for 16-bit inputs makes its own product, so it gets no padded memory to fill."""
    out = None if gemm_in_float32(x.dtype) else _transposed_out(x, weight.shape[0])
    if bias is not None and fold_bias:
        return _mm([(weight, x.t())], bias.unsqueeze(1), out=out), None
    return _mm([(weight, x.t())], out=out), (None if bias is None else bias.contiguous())


def _product_with_bias(x, weight, bias):
    """x W^T + b by one GEMM (float32 / float64: F.linear's bits) into fastnn's own buffer (16-bit:
    x's rows copied together where they lie apart, as _mm does)."""
    z = _empty((x.shape[0], weight.shape[0]), x.dtype, x.device)
    if x.dtype in _HALF:
        x = _unpadded(x)
    return torch.mm(x, weight.t(), out=z) if bias is None else torch.addmm(bias, x, weight.t(), out=z)


def _product_transposed(x, weight):
    """Z^T = W x^T in x's dtype, its rows padded as _transposed_out pads them (one row: W x by
    torch.mv where _one_row_by_mv)."""
    out = _transposed_out(x, weight.shape[0])
    if x.shape[0] == 1 and _one_row_by_mv(x.dtype):
        torch.mv(_unpadded(weight), x[0], out=out[:, 0])
        return out
    return torch.mm(_unpadded(weight), x.t(), out=out)


def _saved_buffer(saves, rows, cols, x):
    """What linear_act's forward keeps for backward, to be filled: Z, its sign mask, or None."""
    if saves == "preact":
        return _empty((rows, cols), x.dtype, x.device)
    if saves == "mask":
        return torch.empty((rows, (cols + 7) // 8), dtype=torch.uint8, device=x.device)
    return None


def _bias_grad_buffer(dtype, cols, device):
    return torch.empty(cols, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)


class CpuBackend(Backend):
    name = "cpu"

    def unsupported_reason(self, op, x, weights, act):
        if _native._C is None:
            return f"the native module fastnn._C is not available ({_native.C_IMPORT_ERROR})"
        if not x.is_cpu:
            return f"it runs on CPU tensors; these are on {x.device}"
        if x.dtype not in _SUPPORTED:
            return f"it supports float32, bfloat16, float16 and float64, not {x.dtype}"
        return None

    def backward_reads_bias(self, dtype, act):
        # a product kept without the bias (_fold_bias: 16-bit, float32 on Intel); relu's mask and the
        # identity need none
        return (act is None or act.saves == "preact") and not _fold_bias(dtype, act)

    def linear_act_fwd(self, x, weight, bias, act, save):
        y, kept = self._linear_act(x, weight, bias, act, act.saves if save else "nothing")
        return y, (empty_like_nothing(x) if kept is None else kept)

    # The common inference calls (no gradient) of linear_act and linear_glu in one frame each, what
    # _linear_act / _linear_glu do for them: right after a large GEMM each Python call costs
    # microseconds (caches cold), and the dozen through the general forward cost more than the pass
    # saves at few rows (Xeon with AMX, 2 threads, paired: float32 gelu at 1-64 x 768 -> 3072 and
    # 16 x 3072 -> 768 1.01-1.05x faster this way; bfloat16 gelu at 1 x 768 -> 3072 1.05x,
    # at 16-256 rows 1.04-1.07x). The three: float32 / float64 in F.linear's orientation (the GEMM or
    # the pass adds the bias, see _fold_bias; the pass runs in place), and 16-bit on oneDNN's native
    # kernels where the pass adds the bias: Z^T = W x^T, then the pass writes y, where product_transposed
    # says (AMX; bfloat16 without AMX at 16-64 rows); else (the AVX512-BF16 AMD EPYCs) x W^T and the
    # pass in place, as float32 (Zen 4, the bfloat16 MLP block at 16 x 64 -> 64 without a gradient,
    # hot: 60-66 us against 68-79 through _linear_act, eager 50-53).
    def linear_act_y(self, x, weight, bias, act):
        dtype, rows, cols = x.dtype, x.shape[0], weight.shape[0]
        bias_in_pass = dtype in _HALF and not _fold_bias(dtype, act)
        if (dtype in _FLOAT or bias_in_pass) and not product_transposed(rows, dtype, not bias_in_pass, (weight,)):
            add = _bias_to_add(bias, dtype, act)  # (held: the pass reads it by pointer)
            z = _product_with_bias(x, weight, None if add is not None else bias)
            if act.name != "identity" or add is not None:
                _native.cpu_module().cpu_bias_act_forward(_native.DTYPE_CODES[dtype], act.code, rows, cols,
                                                          z.data_ptr(), _ptr(add), z.data_ptr(), 0,
                                                          _native.num_threads())
            return z
        if bias_in_pass:
            z_t = _product_transposed(x, weight)
            y = _empty((rows, cols), dtype, x.device)
            bias = None if bias is None else bias.contiguous()  # (held: the pass reads it by pointer)
            _native.cpu_module().cpu_act_forward_from_transposed(
                _native.DTYPE_CODES[dtype], act.code, rows, cols, z_t.data_ptr(), z_t.stride(0), _ptr(bias),
                y.data_ptr(), 0, 0, _native.num_threads())
            return y
        return self._linear_act(x, weight, bias, act, "nothing")[0]

    def _linear_act(self, x, weight, bias, act, saves):
        """-> (y, what backward needs: Z, its mask, or None)."""
        C = _native.cpu_module()
        rows, cols = x.shape[0], weight.shape[0]
        code = _native.DTYPE_CODES[x.dtype]
        fold = _fold_bias(x.dtype, act)
        if product_transposed(rows, x.dtype, fold, (weight,)):
            # Z^T, then one pass: y, and the product or Z's mask, row-major
            product_t, bias = _gemm_transposed(x, weight, bias, fold)
            y = _empty((rows, cols), x.dtype, x.device)
            kept = _saved_buffer(saves, rows, cols, x)
            C.cpu_act_forward_from_transposed(code, act.code, rows, cols, product_t.data_ptr(), product_t.stride(0),
                                              _ptr(bias), y.data_ptr(),
                                              _ptr(kept) if saves == "preact" else 0,
                                              _ptr(kept) if saves == "mask" else 0, _native.num_threads())
            return y, kept
        product, bias = _gemm(x, weight, bias, fold)
        if saves == "preact":
            y = _empty(product.shape, product.dtype, product.device)
            C.cpu_bias_act_forward(code, act.code, rows, cols, product.data_ptr(), _ptr(bias), y.data_ptr(), 0,
                                   _native.num_threads())
            return y, product  # backward adds the bias again
        mask = _saved_buffer(saves, rows, cols, x)
        if act.name != "identity" or bias is not None:
            C.cpu_bias_act_forward(code, act.code, rows, cols, product.data_ptr(), _ptr(bias), product.data_ptr(),
                                   _ptr(mask), _native.num_threads())
        return product, mask

    def linear_act_bwd(self, dy, x, weight, bias, saved, act, need_dx, need_dw, need_db, reuse=()):
        C = _native.cpu_module()
        dy = dy.contiguous()
        rows, cols = dy.shape
        code = _native.DTYPE_CODES[dy.dtype]
        dbias = _bias_grad_buffer(dy.dtype, cols, dy.device) if need_db else None
        # the bias the forward left out of the saved product (see the module docstring)
        bias = _bias_to_add(bias, dy.dtype, act)
        reusable = Reusable(reuse, _empty)
        if act.saves == "nothing":
            dz = dy
            reusable.discard(dy)
            if need_db:
                C.cpu_act_backward(code, act.code, rows, cols, dy.data_ptr(), 0, 0, 0, dbias.data_ptr(),
                                   _native.num_threads())
        else:
            # (the pass reads each element of dY and saved before it writes that element of dZ; memory
            # already mapped spares a fresh dZ's page faults: 8192x1024 float32 on a 2-core AMD EPYC
            # VM, the act' pass took 15.5 ms into a fresh dZ, 7.5 ms into a used one)
            dz = reusable.take(dy.shape, dy)
            C.cpu_act_backward(code, act.code, rows, cols, dy.data_ptr(), saved.data_ptr(), _ptr(bias),
                               dz.data_ptr(), _ptr(dbias), _native.num_threads())
        dx = _mm([(dz, weight)], out=reusable.find((rows, weight.shape[1]), dz)) if need_dx else None
        dw = _wgrad(dz, x) if need_dw else None
        db = _rounded(dbias, dy.dtype) if need_db else None
        return dx, dw, db

    def rebuilds_hidden(self, act, gated):
        return True

    def act_hidden(self, saved, bias, act):
        # the forward's own pass over the kept product (see linear_act_fwd), so the same bits
        rows, cols = saved.shape
        h = _empty(saved.shape, saved.dtype, saved.device)
        bias = _bias_to_add(bias, saved.dtype, act)
        _native.cpu_module().cpu_bias_act_forward(_native.DTYPE_CODES[saved.dtype], act.code, rows, cols,
                                                  saved.data_ptr(), _ptr(bias), h.data_ptr(), 0,
                                                  _native.num_threads())
        return h

    def glu_hidden(self, z_gate, z_up, gate_bias, up_bias, gate_act):
        rows, cols = z_gate.shape
        gate_bias, up_bias = _bias_to_add(gate_bias, z_gate.dtype, gate_act), _bias_to_add(up_bias, z_gate.dtype, None)
        h = _empty(z_gate.shape, z_gate.dtype, z_gate.device)
        _native.cpu_module().cpu_glu_forward(_native.DTYPE_CODES[z_gate.dtype], gate_act.code, rows, cols,
                                             z_gate.data_ptr(), z_up.data_ptr(), _ptr(gate_bias), _ptr(up_bias),
                                             h.data_ptr(), _native.num_threads())
        return h

    def linear_glu_fwd(self, x, gate_weight, up_weight, gate_bias, up_bias, gate_act, save):
        y, z_gate, z_up = self._linear_glu(x, gate_weight, up_weight, gate_bias, up_bias, gate_act, save)
        if not save:
            return y, empty_like_nothing(x), empty_like_nothing(x)
        return y, z_gate, z_up

    def linear_glu_y(self, x, gate_weight, up_weight, gate_bias, up_bias, gate_act):
        # (the one-frame calls of linear_act_y's comment)
        dtype, rows, cols = x.dtype, x.shape[0], gate_weight.shape[0]
        bias_in_pass = dtype in _HALF and not _fold_bias(dtype, gate_act)  # (the up projection's too, then)
        if ((dtype in _FLOAT or bias_in_pass)
                and not product_transposed(rows, dtype, not bias_in_pass, (gate_weight, up_weight))):
            add_gate, add_up = _bias_to_add(gate_bias, dtype, gate_act), _bias_to_add(up_bias, dtype, None)
            p_gate = _product_with_bias(x, gate_weight, None if add_gate is not None else gate_bias)
            p_up = _product_with_bias(x, up_weight, None if add_up is not None else up_bias)
            _native.cpu_module().cpu_glu_forward(_native.DTYPE_CODES[dtype], gate_act.code, rows, cols,
                                                 p_gate.data_ptr(), p_up.data_ptr(), _ptr(add_gate), _ptr(add_up),
                                                 p_gate.data_ptr(), _native.num_threads())
            return p_gate
        if bias_in_pass:
            p_gate, p_up = _product_transposed(x, gate_weight), _product_transposed(x, up_weight)
            y = _empty((rows, cols), dtype, x.device)
            # (held: the pass reads them by pointer)
            gate_bias = None if gate_bias is None else gate_bias.contiguous()
            up_bias = None if up_bias is None else up_bias.contiguous()
            _native.cpu_module().cpu_glu_forward_from_transposed(
                _native.DTYPE_CODES[dtype], gate_act.code, rows, cols, p_gate.data_ptr(), p_up.data_ptr(),
                p_gate.stride(0), _ptr(gate_bias), _ptr(up_bias), y.data_ptr(), 0, 0, _native.num_threads())
            return y
        return self._linear_glu(x, gate_weight, up_weight, gate_bias, up_bias, gate_act, False)[0]

    def _linear_glu(self, x, gate_weight, up_weight, gate_bias, up_bias, gate_act, save):
        """-> (y, z_gate, z_up), the products None without save."""
        C = _native.cpu_module()
        rows, cols = x.shape[0], gate_weight.shape[0]
        fold_gate, fold_up = _fold_bias(x.dtype, gate_act), _fold_bias(x.dtype, None)
        if product_transposed(rows, x.dtype, fold_gate, (gate_weight, up_weight)):
            # as linear_act_fwd: both products transposed (the gate's bias decides, as its sign does)
            p_gate, gate_bias = _gemm_transposed(x, gate_weight, gate_bias, fold_gate)
            p_up, up_bias = _gemm_transposed(x, up_weight, up_bias, fold_up)
            y = _empty((rows, cols), x.dtype, x.device)
            z_gate, z_up = ((_empty(y.shape, y.dtype, y.device), _empty(y.shape, y.dtype, y.device)) if save
                            else (None, None))
            C.cpu_glu_forward_from_transposed(_native.DTYPE_CODES[x.dtype], gate_act.code, rows, cols,
                                              p_gate.data_ptr(), p_up.data_ptr(), p_gate.stride(0), _ptr(gate_bias),
                                              _ptr(up_bias), y.data_ptr(), _ptr(z_gate), _ptr(z_up),
                                              _native.num_threads())
            return y, z_gate, z_up
        p_gate, gate_bias = _gemm(x, gate_weight, gate_bias, fold_gate)
        p_up, up_bias = _gemm(x, up_weight, up_bias, fold_up)
        # without saving, y overwrites the gate product in place
        y = _empty(p_gate.shape, p_gate.dtype, p_gate.device) if save else p_gate
        C.cpu_glu_forward(_native.DTYPE_CODES[x.dtype], gate_act.code, rows, cols, p_gate.data_ptr(),
                          p_up.data_ptr(), _ptr(gate_bias), _ptr(up_bias), y.data_ptr(), _native.num_threads())
        return (y, p_gate, p_up) if save else (y, None, None)  # backward adds the biases again

    def linear_glu_bwd(self, dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, gate_act,
                       need_dx, need_dwg, need_dwu, need_dbg, need_dbu, reuse=()):
        C = _native.cpu_module()
        dy = dy.contiguous()
        rows, cols = dy.shape
        gate_bias, up_bias = _bias_to_add(gate_bias, dy.dtype, gate_act), _bias_to_add(up_bias, dy.dtype, None)
        reusable = Reusable(reuse, _empty)
        # (the pass reads a chunk of dY, z_gate and z_up before it writes that chunk of either dZ)
        dz_gate = reusable.take(dy.shape, dy)
        dz_up = reusable.take(dy.shape, dy)
        dbg = _bias_grad_buffer(dy.dtype, cols, dy.device) if need_dbg else None
        dbu = _bias_grad_buffer(dy.dtype, cols, dy.device) if need_dbu else None
        C.cpu_glu_backward(_native.DTYPE_CODES[dy.dtype], gate_act.code, rows, cols, dy.data_ptr(),
                           z_gate.data_ptr(), z_up.data_ptr(), _ptr(gate_bias), _ptr(up_bias), dz_gate.data_ptr(),
                           dz_up.data_ptr(), _ptr(dbg), _ptr(dbu), _native.num_threads())
        dx = (_mm([(dz_gate, gate_weight), (dz_up, up_weight)],
                  out=reusable.find((rows, gate_weight.shape[1]), dy)) if need_dx else None)
        dwg = _wgrad(dz_gate, x) if need_dwg else None
        dwu = _wgrad(dz_up, x) if need_dwu else None
        return (dx, dwg, dwu, _rounded(dbg, dy.dtype) if need_dbg else None,
                _rounded(dbu, dy.dtype) if need_dbu else None)
