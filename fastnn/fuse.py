"""fastnn.fuse(model): swap known Linear + activation patterns for fused modules, in place.

Patterns:
  * nn.Sequential runs of nn.Linear followed by an activation module (ReLU, GELU with approximate
    "none" or "tanh", SiLU, Sigmoid, Tanh, LeakyReLU with slope 0.01): the Linear becomes a
    FusedLinear and the activation an nn.Identity (the Sequential's indices and keys are kept);
  * torch.nn.TransformerEncoderLayer: becomes fastnn.TransformerEncoderLayer;
  * Hugging Face transformers: BERT's intermediate block (dense + activation), GPT-2's MLP (its
    Conv1D layers store weights as (in, out); they are read transposed, not copied) and
    LLaMA-style gated MLPs (gate_proj, up_proj, down_proj).
Parameters are shared, never copied: optimisers, tied weights and checkpoints keep working and
state_dict keys do not change. Anything with an activation fastnn does not know is left alone.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from . import activations
from .functional import linear_act, linear_glu
from .modules import FusedLinear, TransformerEncoderLayer, activation_name

log = logging.getLogger("fastnn")


@dataclass
class FuseRecord:
    path: str       # the module's qualified name in the model
    kind: str       # what it is
    fused: bool     # swapped or left alone
    detail: str     # what it became, or why not

    def __str__(self):
        return f"{'fused' if self.fused else 'left '} {self.path or '<root>'} ({self.kind}): {self.detail}"


# Hugging Face activation classes -> fastnn names (by class name: transformers need not be installed)
_HF_ACTIVATIONS = {
    "GELUActivation": "gelu", "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh", "FastGELUActivation": None, "QuickGELUActivation": None,
    "SiLUActivation": "silu", "ReLUSquaredActivation": "squared_relu", "LinearActivation": "identity",
}


def _hf_activation_name(act) -> Optional[str]:
    name = activation_name(act)
    if name is not None:
        return name
    cls = type(act).__name__
    if cls == "GELUActivation":
        # transformers' GELUActivation wraps either nn.functional.gelu (exact) or its python form
        return "gelu" if getattr(act, "act", None) in (None, torch.nn.functional.gelu) else None
    return _HF_ACTIVATIONS.get(cls)


class _BertIntermediate(nn.Module):
    """BERT's intermediate block (dense + activation) in one fused op; keys dense.weight/.bias."""

    def __init__(self, original, activation):
        super().__init__()
        self.dense = original.dense
        self.activation = activation

    def forward(self, hidden_states):
        return linear_act(hidden_states, self.dense.weight, self.dense.bias, self.activation)


class _GPT2MLP(nn.Module):
    """GPT-2's MLP (Conv1D c_fc -> act -> Conv1D c_proj -> dropout), c_fc and the act fused."""

    def __init__(self, original, activation):
        super().__init__()
        self.c_fc, self.c_proj, self.dropout = original.c_fc, original.c_proj, original.dropout
        self.activation = activation

    def forward(self, hidden_states):
        # Conv1D keeps (in, out) weights: the (out, in) layout fastnn takes is their transpose
        h = linear_act(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.activation)
        return self.dropout(self.c_proj(h))


class _GatedMLP(nn.Module):
    """LLaMA-style MLP: down_proj(act(gate_proj(x)) * up_proj(x)), the gated unit fused."""

    def __init__(self, original, activation):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = original.gate_proj, original.up_proj, original.down_proj
        self.activation = activation

    def forward(self, x):
        h = linear_glu(x, self.gate_proj.weight, self.up_proj.weight, self.gate_proj.bias, self.up_proj.bias,
                       self.activation)
        return self.down_proj(h)


_GATED_BY_GATE = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}


def _fuse_module(path: str, module: nn.Module, records: List[FuseRecord]) -> Optional[nn.Module]:
    """A fused replacement for `module`, or None (recording why when it is a pattern we know)."""
    cls = type(module).__name__
    if isinstance(module, nn.TransformerEncoderLayer) and not isinstance(module, TransformerEncoderLayer):
        fused = TransformerEncoderLayer.from_torch(module)
        detail = ("fastnn.TransformerEncoderLayer" if fused.fused_activation
                  else "fastnn.TransformerEncoderLayer (SDPA attention; feed-forward unfused: unknown activation)")
        records.append(FuseRecord(path, cls, True, detail))
        return fused
    if cls.endswith("Intermediate") and hasattr(module, "dense") and hasattr(module, "intermediate_act_fn") \
            and isinstance(module.dense, nn.Linear):
        name = _hf_activation_name(module.intermediate_act_fn)
        if name is None:
            records.append(FuseRecord(path, cls, False, f"unknown activation {type(module.intermediate_act_fn).__name__}"))
            return None
        records.append(FuseRecord(path, cls, True, f"dense + {name} fused"))
        return _BertIntermediate(module, name)
    if cls.endswith("MLP") and all(hasattr(module, a) for a in ("c_fc", "c_proj", "act", "dropout")) \
            and type(module.c_fc).__name__ == "Conv1D":
        name = _hf_activation_name(module.act)
        if name is None:
            records.append(FuseRecord(path, cls, False, f"unknown activation {type(module.act).__name__}"))
            return None
        records.append(FuseRecord(path, cls, True, f"c_fc + {name} fused (Conv1D weights read transposed)"))
        return _GPT2MLP(module, name)
    if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) and all(
            isinstance(getattr(module, a), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
        gate = _hf_activation_name(module.act_fn)
        gated = _GATED_BY_GATE.get(gate)
        if gated is None or module.gate_proj.weight.shape != module.up_proj.weight.shape:
            records.append(FuseRecord(path, cls, False, f"gate activation {type(module.act_fn).__name__} not fusable"))
            return None
        records.append(FuseRecord(path, cls, True, f"gate_proj + up_proj as one {gated} unit"))
        return _GatedMLP(module, gated)
    return None


def _fuse_sequential(path: str, seq: nn.Sequential, records: List[FuseRecord]) -> None:
    names = list(seq._modules.keys())
    for i in range(len(names) - 1):
        lin, act = seq._modules[names[i]], seq._modules[names[i + 1]]
        if type(lin) is not nn.Linear:
            continue
        where = f"{path}.{names[i]}" if path else names[i]
        name = activation_name(act)
        if name is None or isinstance(act, nn.Identity):
            if isinstance(act, nn.Module) and type(act).__module__.startswith("torch.nn.modules.activation"):
                why = (f"LeakyReLU slope {act.negative_slope} (fastnn's is {activations.LEAKY_SLOPE})"
                       if isinstance(act, nn.LeakyReLU) else f"{type(act).__name__} has no fastnn activation")
                records.append(FuseRecord(where, "Linear", False, why))
            continue
        seq._modules[names[i]] = FusedLinear.from_linear(lin, name)
        seq._modules[names[i + 1]] = nn.Identity()
        records.append(FuseRecord(where, "Linear", True, f"Linear + {type(act).__name__} -> FusedLinear({name})"))


def fuse(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Swap, in place, the Linear + activation patterns fastnn knows for fused modules; returns
    the model. What was swapped and what was left alone is logged (logger "fastnn"), printed
    with verbose=True, and kept as a list of FuseRecord in `model.fastnn_fuse_report`."""
    records: List[FuseRecord] = []

    def visit(path: str, module: nn.Module) -> None:
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            child_path = f"{path}.{name}" if path else name
            fused = _fuse_module(child_path, child, records)
            if fused is not None:
                module._modules[name] = fused
                continue
            visit(child_path, child)
        if isinstance(module, nn.Sequential):
            _fuse_sequential(path, module, records)

    root = _fuse_module("", model, records)
    if root is not None:
        raise ValueError("fastnn.fuse swaps submodules in place; wrap a bare "
                         f"{type(model).__name__} in a container (or use the fastnn module directly)")
    visit("", model)
    model.fastnn_fuse_report = records
    for r in records:
        log.info("%s", r)
        if verbose:
            print(r)
    if not records and verbose:
        print("fastnn.fuse: no known pattern found")
    return model
