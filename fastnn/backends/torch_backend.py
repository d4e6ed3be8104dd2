"""The `torch` backend: a composite of PyTorch ops. The reference for every other backend (in
float64 it is the test oracle) and the last fallback of `auto`. Autograd is PyTorch's own for
linear_act and linear_glu; the op-level methods below (the Backend interface, forward saving the
pre-activation as F.linear computes it) serve fastnn.mlp's block op."""
from __future__ import annotations

import torch.nn.functional as F

from ..autograd import act_composite, act_dz, compute_dtype, glu_composite, glu_dz
from .base import Backend, empty_like_nothing


class TorchBackend(Backend):
    name = "torch"

    def unsupported_reason(self, op, x, weights, act):
        return None

    @staticmethod
    def linear_act(x, weight, bias, act):
        return act.fn(F.linear(x, weight, bias))

    @staticmethod
    def linear_glu(x, gate_weight, up_weight, gate_bias, up_bias, gate_act):
        return gate_act.fn(F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias)

    def linear_act_fwd(self, x, weight, bias, act, save):
        z = F.linear(x, weight, bias)
        return act_composite(z, act), (z if save and act.saves != "nothing" else empty_like_nothing(x))

    def linear_act_bwd(self, dy, x, weight, bias, saved, act, need_dx, need_dw, need_db, reuse=()):
        dz = dy if act.saves == "nothing" else act_dz(dy, saved, act)
        return (dz @ weight if need_dx else None, dz.t() @ x if need_dw else None,
                _column_sum(dz) if need_db else None)

    def linear_glu_fwd(self, x, gate_weight, up_weight, gate_bias, up_bias, gate_act, save):
        z_gate, z_up = F.linear(x, gate_weight, gate_bias), F.linear(x, up_weight, up_bias)
        y = glu_composite(z_gate, z_up, gate_act)
        if not save:
            return y, empty_like_nothing(x), empty_like_nothing(x)
        return y, z_gate, z_up

    def linear_glu_bwd(self, dy, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, gate_act,
                       need_dx, need_dwg, need_dwu, need_dbg, need_dbu, reuse=()):
        dzg, dzu = glu_dz(dy, z_gate, z_up, gate_act)
        return (dzg @ gate_weight + dzu @ up_weight if need_dx else None,
                dzg.t() @ x if need_dwg else None, dzu.t() @ x if need_dwu else None,
                _column_sum(dzg) if need_dbg else None, _column_sum(dzu) if need_dbu else None)


def _column_sum(dz):
    return dz.to(compute_dtype(dz.dtype)).sum(0).to(dz.dtype)
