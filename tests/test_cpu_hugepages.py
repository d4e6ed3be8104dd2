"""The cpu backend's large buffers are advised to transparent huge pages where Linux gives them on
request (fastnn/backends/cpu.py, `_empty`): the 2 MiB-aligned part of each, never anything outside
it, not small buffers, not with FASTNN_CPU_HUGEPAGES=0, not by default in a VM that reports free
pages to its host (=1 asks there too); and a fused call's large outputs come from such memory."""
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


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return ""


needs_madvise = pytest.mark.skipif("[madvise]" not in _thp_mode(),
                                   reason="transparent huge pages are not in madvise mode here (or not Linux)")


@pytest.fixture
def asked(monkeypatch):
    """The advice on wherever Linux takes it (FASTNN_CPU_HUGEPAGES=1: in a reporting VM too)."""
    monkeypatch.setenv("FASTNN_CPU_HUGEPAGES", "1")
    cpu._madvise.cache_clear()
    yield
    monkeypatch.undo()
    cpu._madvise.cache_clear()


def test_free_page_reporting_read_from_the_balloon_features(tmp_path):
    """The feature string of each virtio balloon, one character per bit, bit 5 free page reporting."""
    assert not cpu.free_page_reporting(str(tmp_path / "absent"))
    dev = tmp_path / "virtio0"
    dev.mkdir()
    (dev / "features").write_text("0110010100000000\n")  # bits 1, 2, 5, 7
    assert cpu.free_page_reporting(str(tmp_path))
    (dev / "features").write_text("0110000100000000\n")
    assert not cpu.free_page_reporting(str(tmp_path))


@needs_madvise
@pytest.mark.parametrize("reporting", [True, False])
def test_not_asked_by_default_in_a_reporting_vm(monkeypatch, reporting):
    monkeypatch.setattr(cpu, "free_page_reporting", lambda: reporting)
    monkeypatch.delenv("FASTNN_CPU_HUGEPAGES", raising=False)
    cpu._madvise.cache_clear()
    try:
        reason = cpu.huge_pages_off_reason()
        assert (reason is not None and "free page reporting" in reason) if reporting else reason is None
        monkeypatch.setenv("FASTNN_CPU_HUGEPAGES", "1")
        assert cpu.huge_pages_off_reason() is None
        assert cpu._madvise() is not None
    finally:
        monkeypatch.undo()
        cpu._madvise.cache_clear()


@needs_madvise
def test_kernel_sees_the_advice(asked):
    t = cpu._empty((40 * MIB // 4,), torch.float32, CPU)  # past malloc's mmap threshold: a mapping of its own
    assert "hg" in _vm_flags(_aligned_inside(t))


@needs_madvise
def test_fused_call_outputs_are_advised(asked):
    x = torch.randn(16, 256)
    w = torch.randn(65536, 256, requires_grad=True)  # dW: 64 MiB, y: 4 MiB
    y = fastnn.linear_act(x, w, None, "relu")
    (dw,) = torch.autograd.grad(y.sum(), w)
    for t in (y, dw):
        assert "hg" in _vm_flags(_aligned_inside(t))
    torch.testing.assert_close(dw, (y > 0).float().t() @ x)
