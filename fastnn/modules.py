"""Drop-in modules: FusedLinear, GatedLinear, FusedMLP and TransformerEncoderLayer."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import activations
from .dropin import fusable_input, plain_callable, plain_module, projection_call
from .functional import RECOMPUTE_LEVELS, linear_act, linear_glu, mlp


def _not_scriptable(module: nn.Module):
    """`__prepare_scriptable__` of fastnn's own modules, which torch.jit.script calls first: their
    forward calls fastnn's ops, which TorchScript cannot compile, and its own error says nothing of
    that ("Compiled functions can't take variable number of arguments ...")."""
    raise TypeError(f"torch.jit.script cannot compile fastnn.{type(module).__name__}: its forward calls fastnn's "
                    "fused ops, which TorchScript does not know. torch.jit.trace, torch.export and torch.compile "
                    "take it; a model of torch's own modules that fastnn.fuse fused scripts (unfused).")


class FusedLinear(nn.Linear):
    """nn.Linear followed by an activation, in one fused op: y = act(x @ W^T + b).

    The parameters, their initialisation and the state_dict keys ("weight", "bias") are
    nn.Linear's own (it is a subclass), so nn.Linear checkpoints load as they are.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "gelu",
                 device=None, dtype=None, backend: str = "auto"):
        activations.get(activation)  # a clear error for an unknown name, before any allocation
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str, backend: str = "auto") -> "FusedLinear":
        """A FusedLinear that shares (not copies) `linear`'s parameters."""
        activations.get(activation)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = linear.in_features, linear.out_features
        fused.weight = linear.weight
        fused.bias = linear.bias
        fused.activation, fused.backend = activation, backend
        return fused

    def forward(self, x: Tensor) -> Tensor:
        return linear_act(x, self.weight, self.bias, self.activation, backend=self.backend)

    __prepare_scriptable__ = _not_scriptable

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class GatedLinear(nn.Module):
    """The gated unit act(x @ Wg^T + bg) * (x @ Wu^T + bu) over two nn.Linear projections.

    Layout: submodules `gate_proj` and `up_proj` (nn.Linear, in_features -> out_features), so the
    state_dict keys are gate_proj.weight, up_proj.weight (and .bias), as in LLaMA-style MLPs.
    While either projection is not a plain nn.Linear (LoRA, hooks, ...: see fastnn.dropin), the
    unit runs unfused through the projections themselves.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "swiglu",
                 device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        activations.get_gated(activation)
        self.gate_proj = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        y = fused_linear_glu(x, self.gate_proj, self.up_proj, nn.Linear, self.activation, backend=self.backend)
        if y is NotImplemented:
            y = activations.get_gated(self.activation).fn(self.gate_proj(x)) * self.up_proj(x)
        return y

    __prepare_scriptable__ = _not_scriptable

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def fused_linear_act(x, linear: nn.Module, linear_cls: type, act, act_name: Optional[str],
                     transposed: bool = False, backend: str = "auto"):
    """act(linear(x)) as one fused op, or NotImplemented when that would not be exactly what
    calling them gives (see fastnn.dropin). transposed: the weight is stored (in, out), as in
    transformers' Conv1D."""
    call = projection_call(linear, linear_cls) if act_name is not None and plain_callable(act) else None
    if call is None:
        return NotImplemented
    weight = linear.weight.t() if transposed else linear.weight
    # (tensor parallel: the fused op runs on each rank's slice, between the module's own hooks)
    xs = call.enter(x)
    if not fusable_input(xs, weight):
        return NotImplemented
    return call.leave(xs, linear_act(xs, weight, linear.bias, act_name, backend=backend))


def fused_linear_glu(x, gate: nn.Module, up: nn.Module, linear_cls: type, glu_name: str, backend: str = "auto"):
    """act(gate(x)) * up(x) as one fused op, or NotImplemented (see fused_linear_act)."""
    # both plain, or (tensor parallel) both column-wise on one mesh with the same layouts
    call, up_call = projection_call(gate, linear_cls), projection_call(up, linear_cls)
    if call is None or up_call is None or call.key != up_call.key:
        return NotImplemented
    xs = call.enter(x)
    if not fusable_input(xs, gate.weight, up.weight) or gate.weight.shape != up.weight.shape:
        return NotImplemented
    return call.leave(xs, linear_glu(xs, gate.weight, up.weight, gate.bias, up.bias, glu_name, backend=backend))


class FusedMLP(nn.Module):
    """fc1 -> activation -> dropout -> fc2, with fc1 and its activation fused.

    With a gated activation (swiglu, geglu, geglu_tanh, reglu), fc1 is a GatedLinear: keys
    fc1.gate_proj.* and fc1.up_proj.*; otherwise fc1 is an nn.Linear: keys fc1.weight, fc1.bias.
    fc2 is an nn.Linear (fc2.weight, fc2.bias). A projection a user wraps (LoRA) or hooks runs
    through the wrapper, unfused: fc1's own output is always the pre-activation, as in an
    unfused MLP. The exception is tensor parallelism's ColwiseParallel on fc1 (parallelize_module):
    its hooks only move data, so fc1 + activation stays fused on each rank's shard (dropin.ColwiseCall).

    recompute=True keeps only the block input (and a copy of fc1's bias) for backward and
    recomputes fc1 and the activation there (activation checkpointing of the block). Per token
    that saves what the block would otherwise keep: the hidden activation fc2 reads
    (hidden_features elements), fc1's pre-activation (hidden_features elements, or
    hidden_features / 8 bytes for relu and leaky_relu; twice hidden_features elements for a gated
    unit) and the dropout mask (hidden_features bytes, when dropout > 0). For bert-base (hidden
    3072, bfloat16, gelu) that is 12 KiB per token.
    recompute may also name a memory level of fastnn.mlp: "none" (= False), "activation" (keep
    fc1's pre-activation, form the hidden activation again in backward: 6 KiB per token for
    bert-base) or "fc1" (= True). The levels apply in training.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None,
                 activation: str = "gelu", bias: bool = True, dropout: float = 0.0, device=None, dtype=None,
                 recompute=False, backend: str = "auto"):
        super().__init__()
        out_features = out_features if out_features is not None else in_features
        if activation in activations.GATED:
            self.fc1 = GatedLinear(in_features, hidden_features, bias, activation, device, dtype, backend)
        else:
            activations.get(activation)
            self.fc1 = nn.Linear(in_features, hidden_features, bias, device, dtype)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        if recompute not in (True, False) and recompute not in RECOMPUTE_LEVELS:
            raise ValueError(f"FusedMLP: recompute must be True, False or one of {', '.join(RECOMPUTE_LEVELS)}; "
                             f"got {recompute!r}")
        self.recompute = recompute
        self.backend = backend

    def _hidden(self, x: Tensor) -> Tensor:
        if isinstance(self.fc1, GatedLinear) or self.activation in activations.GATED:
            return self.fc1(x)
        h = fused_linear_act(x, self.fc1, nn.Linear, None, self.activation, backend=self.backend)
        return h if h is not NotImplemented else activations.get(self.activation).fn(self.fc1(x))

    def _block(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self._hidden(x)))

    def _level(self) -> str:
        return {True: "fc1", False: "none"}.get(self.recompute, self.recompute)

    def _whole_block(self, x: Tensor):
        """fastnn.mlp over the submodules' parameters while every submodule is plain (see
        fastnn.dropin), else NotImplemented."""
        gated = self.activation in activations.GATED
        if gated:
            if not plain_module(self.fc1, GatedLinear) or self.fc1.activation != self.activation:
                return NotImplemented
            fc1s = (self.fc1.gate_proj, self.fc1.up_proj)
        else:
            fc1s = (self.fc1,)
        if not (all(plain_module(m, nn.Linear) for m in (*fc1s, self.fc2)) and plain_module(self.dropout, nn.Dropout)
                and fusable_input(x, *(m.weight for m in fc1s))):
            return NotImplemented
        if fc1s[0].weight.shape != fc1s[-1].weight.shape or self.fc2.weight.shape[1] != fc1s[0].weight.shape[0] \
                or self.fc2.weight.dtype != x.dtype or self.fc2.weight.device != x.device:
            return NotImplemented
        return mlp(x, fc1s[0].weight, fc1s[0].bias, self.fc2.weight, self.fc2.bias, self.activation,
                   up_weight=fc1s[1].weight if gated else None, up_bias=fc1s[1].bias if gated else None,
                   dropout=self.dropout.p, training=self.dropout.training,
                   recompute=self._level() if self.training else "none", backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        y = self._whole_block(x)
        if y is not NotImplemented:
            return y
        if self._level() == "fc1" and torch.is_grad_enabled() and self.training:
            return checkpoint(self._block, x, use_reentrant=False)
        return self._block(x)

    __prepare_scriptable__ = _not_scriptable

    def extra_repr(self) -> str:
        return f"activation={self.activation}, recompute={self.recompute}"


# torch.nn activation functions and module classes that have a fastnn name. Module classes are
# matched exactly: a subclass may compute something else.
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu", torch.sigmoid: "sigmoid",
              F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh"}
_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Identity: "identity"}


def activation_name(act) -> Optional[str]:
    """fastnn's name for a torch activation given as a string, function or module; None if unknown."""
    if isinstance(act, str):
        return act if act in activations.ACTIVATIONS else None
    if not isinstance(act, nn.Module):
        try:
            return _FUNCTIONS.get(act)
        except TypeError:  # unhashable callables
            return None
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) is nn.LeakyReLU:
        return "leaky_relu" if math.isclose(act.negative_slope, activations.LEAKY_SLOPE) else None
    return _MODULES.get(type(act))


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer with the feed-forward block's linear1 + activation fused.

    Everything else is torch's own layer: the signature, defaults and state_dict keys, forward with
    its masks, is_causal, unbatched input, nested tensors and the native fast path in inference,
    self_attn (called as a module, so hooks and replacements work) and errors. Only _ff_block,
    which torch's forward calls, is fastnn's; it runs unfused (torch's code) while linear1 or the
    activation is not plain (LoRA, hooks; see fastnn.dropin) or the activation is a callable
    fastnn does not know. Under torch.jit.script the layer is torch's, unfused.
    """

    def _ff_block(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            out = fused_ff_block(self, x)
            if out is not NotImplemented:
                return out
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


@torch.jit.unused
def fused_ff_block(layer: nn.TransformerEncoderLayer, x: Tensor):
    """torch's TransformerEncoderLayer._ff_block with linear1 + activation fused, or NotImplemented."""
    h = fused_linear_act(x, layer.linear1, nn.Linear, layer.activation, activation_name(layer.activation))
    if h is NotImplemented:
        return h
    return layer.dropout2(layer.linear2(layer.dropout(h)))
