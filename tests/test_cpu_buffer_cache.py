"""The cpu backend's cache of large buffers (fastnn/backends/cpu.py, BufferCache): a buffer goes out
again only once nothing else holds its storage, as a new tensor (not a view) of the same size; free
buffers past the limit are let go; and a training loop gives the same bits with the cache as
without, its earlier outputs and gradients untouched by later steps."""
import threading

import pytest
import torch

import fastnn
from fastnn.backends import cpu

pytestmark = pytest.mark.skipif(cpu.BUFFER_CACHE._alone is None,
                                reason="this torch has no storage use count: the cache is off")

MIB = 1 << 20
SHAPE = (8192, 1024)  # 32 MiB in float32


@pytest.fixture
def cache(monkeypatch):
    """A cache of its own for the test (1 GiB limit), in place of the backend's."""
    c = cpu.BufferCache(1 << 30)
    monkeypatch.setattr(cpu, "BUFFER_CACHE", c)
    return c


def _fresh(shape=SHAPE, dtype=torch.float32):
    return cpu._empty(shape, dtype, torch.device("cpu"))


def test_a_dropped_buffer_goes_out_again_as_a_new_tensor_of_any_shape_and_dtype(cache):
    t = _fresh()
    ptr = t.data_ptr()
    t.fill_(1.0)
    del t
    u = _fresh((16384, 1024), torch.bfloat16)  # the same bytes
    assert u.data_ptr() == ptr
    assert u._base is None and u.is_contiguous() and u.shape == (16384, 1024) and u.dtype == torch.bfloat16
    assert u.untyped_storage().nbytes() == u.numel() * u.element_size()
    v = _fresh((16384, 1024))  # other bytes: a buffer of its own
    assert v.data_ptr() != ptr


@pytest.mark.parametrize("holder", ["view", "detached", "numpy", "storage", "saved by autograd", "grad",
                                    "shared memory"])
def test_a_buffer_is_not_handed_out_while_anything_holds_it(cache, holder):
    t = _fresh()
    t.fill_(3.0)
    ptr = t.data_ptr()
    if holder == "view":
        kept = t[5:]
    elif holder == "detached":
        kept = t.detach()
    elif holder == "numpy":
        kept = t.numpy()
    elif holder == "storage":
        kept = t.untyped_storage()
    elif holder == "saved by autograd":
        w = torch.ones(SHAPE, requires_grad=True)
        kept = (w * t).sum()  # mul keeps t for w's gradient
    elif holder == "grad":
        w = torch.zeros(SHAPE, requires_grad=True)
        w.grad = t
        kept = w
    else:
        t.share_memory_()
        ptr = t.data_ptr()
        kept = None
    del t
    u = _fresh()
    assert u.data_ptr() != ptr
    u.fill_(7.0)
    if holder == "numpy":
        assert (kept == 3.0).all()
    elif holder == "saved by autograd":
        kept.backward()
        assert (w.grad == 3.0).all()
    elif holder == "grad":
        assert (kept.grad == 3.0).all()
    elif holder == "shared memory":  # never handed out; let go once nothing else holds it
        assert cache.held_bytes() == (32 * MIB, 0)  # u alone
        return
    else:
        del kept  # now free: it goes out again
        assert _fresh().data_ptr() == ptr


def test_small_buffers_are_left_to_malloc(cache):
    t = _fresh((cpu.BufferCache.MIN_BYTES // 4096 - 1, 1024))  # 4 KiB less than the smallest kept
    assert cache.held_bytes() == (0, 0)
    del t


def test_free_buffers_past_the_limit_are_let_go(cache):
    cache.limit_bytes = 100 * MIB
    bufs = [_fresh((1024, 1024 * (32 + 8 * i))) for i in range(4)]  # 128, 160, 192, 224 MiB
    assert cache.held_bytes() == (704 * MIB, 0)
    del bufs
    assert cache.held_bytes() == (704 * MIB, 704 * MIB)
    keep = _fresh((1024, 1024 * 36))  # 144 MiB, new: the oldest free ones go until at most 100 MiB are free
    held, free = cache.held_bytes()
    assert free <= 100 * MIB and held == free + 144 * MIB
    cache.clear()
    assert cache.held_bytes() == (144 * MIB, 0)
    del keep


def test_a_limit_of_zero_turns_the_cache_off(cache):
    cache.limit_bytes = 0
    t = _fresh()
    assert cache.held_bytes() == (0, 0)
    del t


def _train(steps, dtype, activation):
    torch.manual_seed(0)
    x = torch.randn(16384, 256).to(dtype).requires_grad_()
    w1 = (torch.randn(1024, 256) * 0.05).to(dtype).requires_grad_()
    b1 = (torch.randn(1024) * 0.1).to(dtype).requires_grad_()
    w2 = (torch.randn(256, 1024) * 0.05).to(dtype).requires_grad_()
    b2 = (torch.randn(256) * 0.1).to(dtype).requires_grad_()
    params = (x, w1, b1, w2, b2)
    outputs, grads = [], []
    for step in range(steps):
        y = fastnn.mlp(x, w1, b1, w2, b2, activation, backend="cpu")
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(step)).to(dtype))
        outputs.append(y.detach())
        grads.append([p.grad for p in params])
        snapshot = [y.clone()] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        with torch.no_grad():
            for p, g in zip(params[1:], grads[-1][1:]):
                p.sub_(0.01 * g)
        yield outputs, grads, snapshot


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_loop_gives_the_same_bits_and_later_steps_touch_no_earlier_result(cache, monkeypatch, dtype):
    snapshots = []
    for outputs, grads, snapshot in _train(4, dtype, "gelu"):
        snapshots.append(snapshot)
        for kept, snap in zip(snapshots, [[o] + g for o, g in zip(outputs, grads)]):
            assert all(torch.equal(a, b) for a, b in zip(snap, kept))  # every step's results as made
    assert cache.held_bytes()[0] > 0
    monkeypatch.setattr(cpu, "BUFFER_CACHE", cpu.BufferCache(0))  # the same loop without the cache
    for (_, _, snapshot), expected in zip(_train(4, dtype, "gelu"), snapshots):
        assert all(torch.equal(a, b) for a, b in zip(snapshot, expected))


def test_threads_never_share_a_buffer(cache):
    """Threads allocating and freeing buffers of one size at once: each result is its own."""
    torch.manual_seed(0)
    x = torch.randn(8192, 64)  # the output: 32 MiB
    w = torch.randn(1024, 64) * 0.05
    expected = torch.nn.functional.gelu(x @ w.t())
    bad = []

    def work(seed):
        for _ in range(20):
            y = fastnn.linear_act(x, w, None, "gelu", backend="cpu")
            if not torch.allclose(y, expected, rtol=1e-5, atol=1e-5):
                bad.append(seed)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    assert cache.held_bytes()[0] % (32 * MIB) == 0 and cache.held_bytes()[0] > 0
