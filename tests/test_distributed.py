"""fastnn modules under torch.distributed, 2 processes on CPU with gloo: DDP and FSDP2
(fully_shard) give the same gradients as one process on the whole batch."""
import os

import pytest
import torch

import fastnn
import gloo


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(fastnn.FusedMLP(16, 48, activation="gelu"), fastnn.FusedLinear(16, 8, activation="silu"),
                               fastnn.FusedMLP(8, 24, out_features=4, activation="swiglu"))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _reference_grads():
    model = _model()
    x, t = _batch()
    torch.nn.functional.mse_loss(model(x), t).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _worker(rank, mode, out_dir):
    model = _model()
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model:
            fully_shard(block)
        wrapped = fully_shard(model)
    x, t = _batch()
    half = x.shape[0] // gloo.WORLD
    sl = slice(rank * half, (rank + 1) * half)
    torch.nn.functional.mse_loss(wrapped(x[sl]), t[sl]).backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP2 keeps sharded DTensors
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, f"{mode}.pt"))


@pytest.mark.skipif(not gloo.available(), reason="needs torch.distributed with gloo (Linux/macOS)")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_same_gradients_as_one_process(mode, tmp_path):
    gloo.spawn(_worker, (mode, str(tmp_path)), tmp_path)
    got = torch.load(tmp_path / f"{mode}.pt")
    ref = _reference_grads()
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5, msg=f"{mode} {name}")
