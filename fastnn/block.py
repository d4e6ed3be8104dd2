"""The MLP block, fc2(act(fc1(x))), as one autograd op (what fastnn.mlp runs eagerly).

One op instead of linear_act + fc2's own autograd node, so that backward decides what the block
keeps (the memory levels), fc2 runs on fastnn's backend too (its GEMM route, its deterministic bias
gradient) and the hidden gradient dH = dY W2 goes straight into fc1's fused act' pass:

    forward:  h, saved = fc1 fused with act (the backend's linear_act / linear_glu forward)
              y = h W2^T + b2
    backward: dW2 = dY^T h, db2 = colsum(dY); dH = dY W2
              dZ1 = dH * act'(z1), db1 = colsum(dZ1), dX = dZ1 W1, dW1 = dZ1^T x   (fc1's backward)
    Where the backend has a hidden_grad kernel (Triton; cuda for relu and gelu_tanh, through
    cuBLASLt's DRELU_BGRAD / DGELU_BGRAD), dZ1 comes from fc2's dgrad GEMM with act' as its
    epilogue and fc1's backward runs as plain GEMMs (dH is never stored); else dH goes into fc1's
    fused act' backward. Gated units keep the latter: their two factors would make the epilogue
    store two tensors, as much memory traffic as the fused backward reads.

Memory levels (what backward keeps beyond the weights and x):
  "none":       fc1's saved tensor (the pre-activation, a 1-bit mask for relu / leaky_relu, two
                pre-activations for a gated unit) and h;
  "activation": the pre-activation(s) only; backward forms h = act(z1) again. Where the backend
                can rebuild h from its own saved tensor (cpu, and cuda but for gelu_tanh: the
                forward's own pass over it, so the same bits) fc1 stays fused; elsewhere fc1 runs as
                a GEMM whose output z1 is kept and the activation runs in PyTorch ops. relu and
                leaky_relu keep h and their 1-bit mask at this level too: the mask cannot give h
                back, and h costs what z1 would.
  "fc1":        nothing but a copy of fc1's biases (so that backward runs fc1 as the forward did);
                backward runs fc1 and its activation again by the forward's own call, so the same
                bits, and not fc2's forward GEMM (which torch.utils.checkpoint would run again).
                With dropout in training, fastnn.mlp checkpoints the block instead, for PyTorch's
                random stream.

Not here: dropout between the activation and fc2 in training (fastnn.mlp composes the ops there,
to keep PyTorch's dropout and its random stream), torch.compile and tensor subclasses (the
torch.library ops), torch.func transforms (PyTorch's composite).
"""
from __future__ import annotations

import torch

from . import activations
from .autograd import (act_composite, act_dz, bias_for_composite, differentiable_backward_wanted, glu_composite,
                       glu_dz, keep_bias, saved_may_be_overwritten, saved_tensor_hooks_active)
from .backends import BACKENDS
from .backends.base import empty_like_nothing
from .dropin import batched, functorch_active

IDENTITY = activations.get("identity")


class MlpFunction(torch.autograd.Function):
    """fc2(act(fc1(x))) on one backend; inputs (x, w1, b1, wu, bu, w2, b2, activation, backend,
    level), x 2-D; wu / bu (the up projection) for a gated activation, None otherwise."""

    @staticmethod
    def forward(ctx, x, w1, b1, wu, bu, w2, b2, activation, backend, level):
        be = BACKENDS[backend]
        gated = wu is not None
        act = activations.get_gated(activation) if gated else activations.get(activation)
        # at the "activation" level: rebuild h from the backend's own saved tensor where it can,
        # else keep the GEMM output z1 and apply the activation in PyTorch ops
        rebuild = level == "activation" and (gated or act.saves == "preact")
        native_rebuild = rebuild and be.rebuilds_hidden(act, gated)
        if rebuild and not native_rebuild:
            z = [be.linear_act_y(x, w, b, IDENTITY) for w, b in ((w1, b1), (wu, bu))[:1 + gated]]
            h = glu_composite(*z, act) if gated else act_composite(z[0], act)
            saved = tuple(z)
        elif gated:
            h, z_gate, z_up = be.linear_glu_fwd(x, w1, wu, b1, bu, act, True)
            saved = (z_gate, z_up)
        else:
            h, s = be.linear_act_fwd(x, w1, b1, act, True)
            saved = (s,)
        y = be.linear_act_y(h, w2, b2, IDENTITY)
        ctx.be, ctx.act, ctx.gated = be, act, gated
        ctx.rebuild, ctx.native_rebuild = rebuild, native_rebuild
        ctx.recompute_fc1 = level == "fc1"
        ctx.has_bias = (b1 is not None, bu is not None, b2 is not None)
        # h and z1 never leave this op, so backward may write into them (fastnn/autograd.py)
        ctx.private_saved = not saved_tensor_hooks_active()
        # fc1's biases as fastnn/autograd.py keeps them (fc2's: its gradient is dY's column sums);
        # the "fc1" level runs fc1 again in backward, so it keeps them as the forward saw them
        b1, b1_at_forward = keep_bias(b1, ctx.recompute_fc1 or be.backward_reads_bias(x.dtype, act))
        bu, bu_at_forward = keep_bias(bu, gated and (ctx.recompute_fc1 or be.backward_reads_bias(x.dtype, None)))
        ctx.biases_at_forward = (b1_at_forward, bu_at_forward)
        if ctx.recompute_fc1:
            ctx.save_for_backward(x, w1, b1, wu, bu, w2, None)
        else:
            ctx.save_for_backward(x, w1, b1, wu, bu, w2, None if rebuild else h, *saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, b1, wu, bu, w2, h, *saved = ctx.saved_tensors
        n = ctx.needs_input_grad
        tail = (None, None, None)
        if functorch_active() or batched(dy) or differentiable_backward_wanted():
            b1, bu = (bias_for_composite(ctx, i, b, "mlp") for i, b in enumerate((b1, bu)))
            return _composite_backward(ctx, dy, x, w1, b1, wu, bu, w2) + tail
        be, act, gated = ctx.be, ctx.act, ctx.gated
        dy = dy.contiguous()
        # what backward may write its gradients into: the saved h and z1 once autograd frees them,
        # h rebuilt here, fc2's dgrad dH once fc1's backward has read it
        freed = saved_may_be_overwritten(ctx)
        if ctx.recompute_fc1:  # fc1 and its activation again, by the forward's own call: the same bits
            if gated:
                h, *saved = be.linear_glu_fwd(x, w1, wu, b1, bu, act, True)
            else:
                h, *saved = be.linear_act_fwd(x, w1, b1, act, True)
            freed = True  # made here, read by nothing else
            h_free = (h,)
        elif h is None:  # the "activation" level
            if ctx.native_rebuild:
                h = be.glu_hidden(*saved, b1, bu, act) if gated else be.act_hidden(saved[0], b1, act)
            else:
                h = glu_composite(*saved, act) if gated else act_composite(saved[0], act)
            h_free = (h,)
        else:
            h_free = (h,) if freed else ()
        reuse_saved = tuple(saved) if freed else ()
        nothing = empty_like_nothing(dy)
        _, dw2, db2 = be.linear_act_bwd(dy, h, nothing, None, nothing, IDENTITY, False, n[5], n[6] and ctx.has_bias[2])
        del h
        need = (n[0], n[1], n[2] and ctx.has_bias[0], n[3], n[4] and ctx.has_bias[1])
        dx = dw1 = db1 = dwu = dbu = None
        dz = None
        if any(need) and not (gated or ctx.rebuild):
            dz = be.hidden_grad(dy, w2, saved[0], act, reuse=h_free)
        if dz is not None:  # fc2's dgrad with act' as its epilogue: fc1's backward is its plain GEMMs
            dx, dw1, db1 = be.linear_act_bwd(dz, x, w1, b1, nothing, IDENTITY, need[0], need[1], need[2])
        elif any(need):
            dh = be.linear_act_bwd(dy, nothing, w2, None, nothing, IDENTITY, True, False, False, reuse=h_free)[0]
            del h_free
            reuse = (*reuse_saved, dh)
            if ctx.rebuild and not ctx.native_rebuild:
                # dZ from the kept GEMM outputs in PyTorch ops, then fc1's GEMMs (identity: db only)
                if gated:
                    dzg, dzu = glu_dz(dh, *saved, act)
                    dx, dw1, db1 = be.linear_act_bwd(dzg, x, w1, b1, nothing, IDENTITY, need[0], need[1], need[2])
                    dxu, dwu, dbu = be.linear_act_bwd(dzu, x, wu, bu, nothing, IDENTITY, need[0], need[3], need[4])
                    dx = dx + dxu if need[0] else None
                else:
                    dz = act_dz(dh, saved[0], act)
                    dx, dw1, db1 = be.linear_act_bwd(dz, x, w1, b1, nothing, IDENTITY, need[0], need[1], need[2])
            elif gated:
                dx, dw1, dwu, db1, dbu = be.linear_glu_bwd(dh, x, w1, wu, b1, bu, *saved, act, need[0], need[1],
                                                           need[3], need[2], need[4], reuse=reuse)
            else:
                dx, dw1, db1 = be.linear_act_bwd(dh, x, w1, b1, saved[0], act, need[0], need[1], need[2],
                                                 reuse=reuse)
        grads = (dx, dw1, db1, dwu, dbu, dw2, db2)
        return tuple(g if ok else None for g, ok in zip(grads, (*need, n[5], n[6]))) + tail


def _composite_backward(ctx, dy, x, w1, b1, wu, bu, w2):
    """The block's backward in PyTorch ops: for a backward vmapped over its grad outputs, and for
    one run with create_graph=True, whose gradients are then differentiable functions of the
    block's inputs and dy (the block is run again on the inputs themselves, not detached copies)."""
    n = ctx.needs_input_grad
    inputs = (x, w1, b1, wu, bu, w2)
    differentiable = differentiable_backward_wanted()
    with torch.enable_grad():
        if differentiable:
            leaves = list(inputs)
        else:
            leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        x_, w1_, b1_, wu_, bu_, w2_ = leaves
        if ctx.gated:
            h = ctx.act.fn(torch.nn.functional.linear(x_, w1_, b1_)) * torch.nn.functional.linear(x_, wu_, bu_)
        else:
            h = ctx.act.fn(torch.nn.functional.linear(x_, w1_, b1_))
        y = torch.nn.functional.linear(h, w2_, None)
    wanted = [i for i, t in enumerate(leaves) if t is not None and n[i]]
    got = (torch.autograd.grad(y, [leaves[i] for i in wanted], dy, allow_unused=True, create_graph=differentiable)
           if wanted else ())  # (fc2's bias alone may need a gradient: no graph to ask)
    grads = [None] * len(leaves)
    for i, g in zip(wanted, got):
        grads[i] = g
    db2 = dy.sum(0) if ctx.has_bias[2] and n[6] else None
    return (*grads, db2)
