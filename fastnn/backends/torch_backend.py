"""The `torch` backend: a composite of PyTorch ops. The reference for every other backend (in
float64 it is the test oracle) and the last fallback of `auto`. Autograd is PyTorch's own."""
from __future__ import annotations

import torch.nn.functional as F

from .base import Backend


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
