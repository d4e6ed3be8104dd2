"""Tensor parallelism on PyTorch's own engine: DTensor sharding rules for fastnn's ops.

With fc1's weight (and bias) sharded by output feature (Shard(0), as ColwiseParallel shards an
nn.Linear) and x replicated, each rank runs fastnn's fused kernels on its own slice of the hidden
features: y and what backward keeps are sharded along their last dim, dW and db come back sharded
like W and b, and dX is a partial sum that DTensor adds across ranks. Everything replicated runs
as is. Other layouts (a row-wise fc1 would need the activation of a partial sum) are redistributed
by DTensor to one of these first.

Registered when fastnn is imported, where torch.distributed.tensor exists.
"""
from __future__ import annotations

import torch


def _strategies(outputs, inputs, n_other):
    """[(output placements, input placements)] for the column-wise layout and the replicated one.

    outputs: placements of the sharded layout, one per output; inputs: (arg, placement) pairs for
    the tensor arguments, the placement used when arg is a tensor of 2 dims (fastnn's empty 1-D
    stand-ins, for what a call does not keep or compute, stay replicated); n_other: the number of
    non-tensor arguments after them (None each)."""
    from torch.distributed.tensor import Replicate

    def placement(arg, p):
        if arg is None or not hasattr(arg, "ndim"):
            return None
        return p if arg.ndim == 2 or p.is_partial() or getattr(p, "dim", None) == 0 else Replicate()

    tail = [None] * n_other
    sharded = (outputs, [placement(a, p) for a, p in inputs] + tail)
    replicated = ([Replicate()] * len(outputs), [placement(a, Replicate()) for a, _ in inputs] + tail)
    return [sharded, replicated]


def register() -> bool:
    """Registers the rules; False where DTensor is not available."""
    try:
        from torch.distributed.tensor import Partial, Replicate, Shard
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError:
        return False
    from . import activations

    rep, col, row = Replicate(), Shard(0), Shard(1)
    ops = torch.ops.fastnn

    def kept(saves):  # a [rows, hidden] tensor, sharded like y, or an empty stand-in
        return row if saves else rep

    def act_fwd(x, weight, bias, activation, *rest):  # rest: (backend,) save
        saves = rest[-1] and activations.get(activation).saves != "nothing"
        return _strategies([row, kept(saves)], [(x, rep), (weight, col), (bias, col)], 1 + len(rest))

    def act_bwd(dy, x, weight, bias, saved, *rest):
        return _strategies([Partial(), col, col], [(dy, row), (x, rep), (weight, col), (bias, col), (saved, row)],
                           len(rest))

    def glu_fwd(x, gate_weight, up_weight, gate_bias, up_bias, activation, *rest):
        return _strategies([row, kept(rest[-1]), kept(rest[-1])],
                           [(x, rep), (gate_weight, col), (up_weight, col), (gate_bias, col), (up_bias, col)],
                           1 + len(rest))

    def glu_bwd(dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, *rest):
        return _strategies([Partial(), col, col, col, col],
                           [(dy, row), (x, rep), (gate_weight, col), (up_weight, col), (gate_bias, col),
                            (up_bias, col), (z_gate, row), (z_up, row)], len(rest))

    def kept_copy(t):  # a bias's copy (autograd.keep_bias), placed as the bias
        return [([col], [col]), ([rep], [rep])]

    register_sharding(ops.kept_copy.default)(kept_copy)
    rules = {"linear_act_fwd": act_fwd, "linear_act_bwd": act_bwd, "linear_glu_fwd": glu_fwd,
             "linear_glu_bwd": glu_bwd}
    for name, rule in rules.items():
        for prefix in ("", "triton_"):
            if hasattr(ops, prefix + name):
                register_sharding(getattr(ops, prefix + name).default)(rule)
    return True
