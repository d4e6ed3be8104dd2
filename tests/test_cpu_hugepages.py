"""The cpu backend's large buffers are advised to transparent huge pages where Linux gives them on
request (fastnn/backends/cpu.py, `_empty`): the 2 MiB-aligned part of each, never anything outside
it, not small buffers, not with FASTNN_CPU_HUGEPAGES=0; and a fused call's large outputs come from
such memory."""
import pytest
import torch

import fastnn
from fastnn.backends import cpu

MIB = 1 << 20
CPU = torch.device("cpu")


def _vm_flags(addr):
    """The VmFlags of the mapping of /proc/self/smaps that holds addr."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _aligned_inside(t):
    return -(-t.data_ptr() // (2 * MIB)) * (2 * MIB)


@pytest.fixture
def advice(monkeypatch):
    """Records the madvise calls _empty makes: [(start, length, advice)]."""
    calls = []
    monkeypatch.setattr(cpu, "_madvise", lambda: lambda start, length, what: calls.append((start, length, what)))
    return calls


@pytest.mark.parametrize("shape", [(4096, 1024), (1000, 3001), (3, 5, 700000)])
def test_advice_covers_the_aligned_part(advice, shape):
    t = cpu._empty(shape, torch.float32, CPU)
    assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
    ((start, length, what),) = advice
    end = t.data_ptr() + t.numel() * 4
    assert what == 14  # MADV_HUGEPAGE
    assert start % (2 * MIB) == 0 and length % (2 * MIB) == 0 and length > 0
    assert t.data_ptr() <= start and start - t.data_ptr() < 2 * MIB
    assert start + length <= end and end - (start + length) < 2 * MIB


@pytest.mark.parametrize("shape", [(1024, 1023), (0, 5000000), (7,)])
def test_small_buffers_are_not_advised(advice, shape):
    cpu._empty(shape, torch.float32, CPU)
    assert advice == []


def test_switched_off(monkeypatch):
    monkeypatch.setenv("FASTNN_CPU_HUGEPAGES", "0")
    cpu._madvise.cache_clear()
    try:
        assert cpu._madvise() is None
    finally:
        monkeypatch.undo()
        cpu._madvise.cache_clear()


needs_madvise = pytest.mark.skipif(cpu._madvise() is None,
                                   reason="transparent huge pages are not in madvise mode here (or not Linux)")


@needs_madvise
def test_kernel_sees_the_advice():
    t = cpu._empty((40 * MIB // 4,), torch.float32, CPU)  # past malloc's mmap threshold: a mapping of its own
    assert "hg" in _vm_flags(_aligned_inside(t))


@needs_madvise
def test_fused_call_outputs_are_advised():
    x = torch.randn(16, 256)
    w = torch.randn(65536, 256, requires_grad=True)  # dW: 64 MiB, y: 4 MiB
    y = fastnn.linear_act(x, w, None, "relu")
    (dw,) = torch.autograd.grad(y.sum(), w)
    for t in (y, dw):
        assert "hg" in _vm_flags(_aligned_inside(t))
    torch.testing.assert_close(dw, (y > 0).float().t() @ x)
