"""fastnn.fuse(model): run the Linear + activation patterns fastnn knows as fused ops, in place.

Nothing is swapped: fuse installs a fused version of one method (forward, or the method the
model's own forward calls for its feed-forward block) on each matching module instance
(fastnn.dropin.FusedCall). Every module keeps its class, children, parameters, buffers,
state_dict keys, hooks and train/eval state, so the fused model is the same model to the code
around it. At each call the fused method checks that the parts are still plain (no LoRA or other
wrapper, no hooks, no offloading, inputs F.linear takes as they are); otherwise the module's own
method runs, unfused. fastnn.unfuse(model) removes what fuse installed, and so does torch.jit.script,
which compiles the classes' own methods (dropin.UnfuseForScripting).

Patterns (by structure: the children a module has, so a module with more parts is left alone):
  * nn.Sequential (and subclasses that keep its forward, e.g. torchvision's MLP): each nn.Linear
    followed by an activation module fastnn knows;
  * torch.nn.TransformerEncoderLayer: linear1 + activation in its _ff_block;
  * Hugging Face transformers, see _FAMILIES below (BERT-family intermediates, GPT-2, GPT-NeoX,
    Falcon, DistilBERT, T5, CLIP/SigLIP-style MLPs, LLaMA-style gated MLPs, Phi-3's gate_up_proj);
  * timm's Mlp, GluMlp (one fc1 whose halves are value and gate) and SwiGLU, by their exact class
    names from timm (their children's names are too common to match on structure alone), with
    torch's activation modules or timm's own;
  * OPT, BART and Whisper layers, whose own forward runs activation_fn(fc1(x)) (_LAYER_FFN).
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import activations, dropin
from .functional import RECOMPUTE_LEVELS, linear_act, linear_glu, mlp
from .modules import TransformerEncoderLayer, activation_name, fused_ff_block, fused_linear_act, fused_linear_glu

log = logging.getLogger("fastnn")


@dataclass
class FuseRecord:
    path: str       # the module's qualified name in the model
    kind: str       # what it is
    fused: bool     # fused or left alone
    detail: str     # what runs fused, or why not

    def __str__(self):
        return f"{'fused' if self.fused else 'left '} {self.path or '<root>'} ({self.kind}): {self.detail}"


# Hugging Face activation classes -> fastnn names (by class name: transformers need not be installed)
_HF_ACTIVATIONS = {
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh", "SiLUActivation": "silu", "ReLUSquaredActivation": "squared_relu",
    "LinearActivation": "identity", "QuickGELUActivation": "quick_gelu",
}
# timm's own activation classes (timm.layers.activations), which its get_act_layer gives for the
# names "gelu", "gelu_tanh", "quick_gelu", "sigmoid" and "tanh" (ConvNeXt, MaxViT, CoAtNet, GCViT, ...);
# each forward is the one PyTorch op (or quick_gelu's z * sigmoid(1.702 z)); an inplace=True one
# only overwrites fc1's output, which nothing else sees
_TIMM_ACTIVATIONS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "Sigmoid": "sigmoid",
                     "Tanh": "tanh"}


def _activation_name(act) -> Optional[str]:
    """fastnn's name for a torch, Hugging Face or timm activation; None if fastnn has none."""
    name = activation_name(act)
    if name is not None or isinstance(act, str):
        return name
    cls = type(act)
    if cls.__module__ == "timm.layers.activations":
        return _TIMM_ACTIVATIONS.get(cls.__name__)
    if not cls.__module__.startswith("transformers"):
        return None
    if cls.__name__ == "GELUActivation":  # wraps F.gelu (exact) or its Python form
        return "gelu" if getattr(act, "act", None) is F.gelu else None
    return _HF_ACTIVATIONS.get(cls.__name__)


_GATED_BY_GATE = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}


def _linear_class(proj) -> Optional[type]:
    """The projection class fastnn reads weights from directly: nn.Linear, or transformers'
    Conv1D (weights (in, out)) and FalconLinear (nn.Linear's math); None for any other (a 1x1
    Conv2d, as in timm's conv-MLP ConvNeXts, or a subclass of nn.Linear with its own forward). A
    wrapper (PEFT's LoRA keeps the original as base_layer) is looked through, so that the fused
    path comes back once the wrapper is merged away; while it is there, the module runs unfused."""
    proj = getattr(proj, "base_layer", proj)
    cls = type(proj)
    if cls is nn.Linear or (cls.__module__.startswith("transformers") and cls.__name__ in ("Conv1D", "FalconLinear")):
        return cls
    return None


# ---- what the families do after their activation (the rest of the replaced method) --------------
def _rest_none(m, h):
    return h


def _rest_gpt2(m, h):
    return m.dropout(m.c_proj(h))


def _rest_neox(m, h):
    return m.dense_4h_to_h(h)


def _rest_distilbert(m, h):
    return m.dropout(m.lin2(h))


def _rest_fc2(m, h):
    return m.fc2(h)


def _rest_down(m, h):
    return m.down_proj(h)


def _rest_timm(m, h):
    return m.drop2(m.fc2(m.norm(m.drop1(h))))


def _rest_t5(m, h):
    h = m.dropout(h)
    # T5 keeps wo in float32 for some checkpoints; its forward casts (not for int8 weights)
    if isinstance(m.wo.weight, torch.Tensor) and h.dtype != m.wo.weight.dtype and m.wo.weight.dtype != torch.int8:
        h = h.to(m.wo.weight.dtype)
    return m.wo(h)


def _after_dropout(m, y):
    return m.dropout(y)


def _after_timm(m, y):
    return m.drop2(y)


@dataclass(frozen=True)
class _Family:
    """A feed-forward block: the exact children it has, the method fuse replaces, where its
    activation and projections are, and what that method does after the activation."""
    name: str
    children: frozenset
    act: str
    rest: Callable
    method: str = "forward"
    linear: str = ""     # linear_act: the projection before the activation
    gate: str = ""       # linear_glu: the gate and up projections...
    up: str = ""
    gate_up: str = ""    # ...or one projection with the gate's rows first
    transposed: bool = False
    # the whole block as one fastnn.mlp op: the projection after the activation, the children
    # between them (dropout, an identity norm) and what the method does with its output
    down: str = ""
    between: tuple = ()
    after: Optional[Callable] = None
    class_suffix: str = ""
    library: str = ""    # only this library's classes named exactly class_suffix (their children are common names)

    def matches(self, module) -> bool:
        names = set(module._modules)
        act = getattr(module, self.act, None)
        if act is not None and not isinstance(act, nn.Module):
            names.add(self.act)
        cls = type(module)
        if self.library and not (cls.__module__.startswith(self.library + ".") and cls.__name__ == self.class_suffix):
            return False
        return (names == self.children and cls.__name__.endswith(self.class_suffix)
                and callable(getattr(cls, self.method, None)))


_FAMILIES = [
    _Family("BERT-family intermediate (BERT, RoBERTa, DeBERTa-v2, ELECTRA, ViT, ...)",
            frozenset({"dense", "intermediate_act_fn"}), "intermediate_act_fn", _rest_none, linear="dense",
            class_suffix="Intermediate"),
    _Family("GPT-2 MLP (Conv1D weights read transposed)", frozenset({"c_fc", "c_proj", "act", "dropout"}), "act",
            _rest_gpt2, linear="c_fc", transposed=True, down="c_proj", after=_after_dropout),
    _Family("GPT-NeoX / Falcon MLP", frozenset({"dense_h_to_4h", "dense_4h_to_h", "act"}), "act", _rest_neox,
            linear="dense_h_to_4h", down="dense_4h_to_h"),
    _Family("DistilBERT FFN (ff_chunk)", frozenset({"lin1", "lin2", "activation", "dropout"}), "activation",
            _rest_distilbert, method="ff_chunk", linear="lin1", down="lin2", after=_after_dropout),
    _Family("T5 DenseActDense", frozenset({"wi", "wo", "dropout", "act"}), "act", _rest_t5, linear="wi", down="wo",
            between=("dropout",)),
    _Family("CLIP / SigLIP-style MLP", frozenset({"fc1", "fc2", "activation_fn"}), "activation_fn", _rest_fc2,
            linear="fc1", down="fc2"),
    _Family("LLaMA-style gated MLP (LLaMA, Mistral, Qwen2/3, Gemma, ...)",
            frozenset({"gate_proj", "up_proj", "down_proj", "act_fn"}), "act_fn", _rest_down, gate="gate_proj",
            up="up_proj", down="down_proj"),
    _Family("Phi-3 gated MLP (gate_up_proj)", frozenset({"gate_up_proj", "down_proj", "activation_fn"}),
            "activation_fn", _rest_down, gate_up="gate_up_proj", down="down_proj"),
    _Family("T5 DenseGatedActDense", frozenset({"wi_0", "wi_1", "wo", "dropout", "act"}), "act", _rest_t5,
            gate="wi_0", up="wi_1", down="wo", between=("dropout",)),
    _Family("timm Mlp (ViT, MLP-Mixer, ...)", frozenset({"fc1", "act", "drop1", "norm", "fc2", "drop2"}), "act",
            _rest_timm, linear="fc1", class_suffix="Mlp", library="timm", down="fc2", between=("drop1", "norm"),
            after=_after_timm),
    _Family("timm GluMlp (one fc1, halves gate and value)", frozenset({"fc1", "act", "drop1", "norm", "fc2", "drop2"}),
            "act", _rest_timm, gate_up="fc1", class_suffix="GluMlp", library="timm", down="fc2",
            between=("drop1", "norm"), after=_after_timm),
    _Family("timm SwiGLU", frozenset({"fc1_g", "fc1_x", "act", "drop1", "norm", "fc2", "drop2"}), "act", _rest_timm,
            gate="fc1_g", up="fc1_x", class_suffix="SwiGLU", library="timm", down="fc2", between=("drop1", "norm"),
            after=_after_timm),
]


def _family_activation_name(fam: _Family, act) -> Optional[str]:
    """fastnn's name for what a family module computes with `act`: the activation, or for a gated
    family the gated unit it makes; None if fastnn has none."""
    name = _activation_name(act)
    return name if name is None or fam.linear else _GATED_BY_GATE.get(name)


def _fused_family(call, *args, **kwargs):
    """The installed method of a _Family module; NotImplemented -> the module's own method."""
    if len(args) != 1 or kwargs:
        return NotImplemented
    x, m, fam, parts = args[0], call.module, call.parts["family"], call.parts
    act = getattr(m, fam.act, None)
    if act is not parts["act"] and _family_activation_name(fam, act) != parts["name"]:
        return NotImplemented  # replaced since fuse by another activation (a DataParallel replica's copy is the same)
    if not dropin.plain_callable(act):
        return NotImplemented
    if fam.down:
        y = _fused_block(x, m, fam, parts)
        if y is not NotImplemented:
            return y if fam.after is None else fam.after(m, y)
    if fam.linear:
        h = fused_linear_act(x, getattr(m, fam.linear), parts["linear_cls"], act, parts["name"], fam.transposed)
    elif fam.gate:
        h = fused_linear_glu(x, getattr(m, fam.gate), getattr(m, fam.up), parts["linear_cls"], parts["name"])
    else:
        proj = getattr(m, fam.gate_up)
        if not dropin.plain_module(proj, parts["linear_cls"]) or not dropin.fusable_input(x, proj.weight):
            return NotImplemented
        halves = _gate_up_halves(m, proj)
        if halves is None:
            return NotImplemented
        h = linear_glu(x, *halves, parts["name"])
    if h is NotImplemented:
        return h
    return fam.rest(m, h)


def _gate_up_halves(m, proj):
    """(gate weight, up weight, gate bias, up bias) of one projection whose output rows are the two
    halves, as the family module's forward splits them; None where it splits otherwise."""
    if getattr(m, "chunk_dim", -1) != -1 or proj.weight.dim() != 2 or proj.weight.shape[0] % 2:
        return None
    gate_w, up_w = proj.weight.chunk(2, dim=0)
    gate_b, up_b = (None, None) if proj.bias is None else proj.bias.chunk(2)
    if getattr(m, "gate_last", False):  # timm's GluMlp: value first, gate second
        return up_w, gate_w, up_b, gate_b
    return gate_w, up_w, gate_b, up_b


def _fused_block(x, m, fam: _Family, parts):
    """The family module's block, act(fc1(x)) through `fam.down`, as one fastnn.mlp op (its backward
    takes fc2's gradient straight into fc1's, and on the cpu backend reads dW's factors as it lays
    them out); NotImplemented unless every projection is plain (no wrapper, hook or tensor-parallel
    plan: those keep the fc1 + activation op and run `down` as it is), the children between are
    an identity or a dropout (at most one active: fastnn.mlp then applies F.dropout as nn.Dropout
    does, same random stream), and all weights share x's dtype and device (T5 can keep wo in
    float32: its forward casts, which the module's own path keeps doing)."""
    dropout = 0.0
    for name in fam.between:
        mod = getattr(m, name)
        if type(mod) is nn.Dropout and dropin.plain_module(mod, nn.Dropout):
            if mod.training and mod.p > 0:
                if dropout:
                    return NotImplemented
                dropout = mod.p
        elif not (type(mod) is nn.Identity and dropin.plain_module(mod, nn.Identity)):
            return NotImplemented
    cls = parts["linear_cls"]
    projections = [getattr(m, n) for n in (fam.linear, fam.gate, fam.up, fam.gate_up, fam.down) if n]
    if not all(dropin.plain_module(p, cls) for p in projections):
        return NotImplemented
    weight = (lambda p: p.weight.t()) if fam.transposed else (lambda p: p.weight)
    if not dropin.fusable_input(x, weight(projections[0])):
        return NotImplemented  # (before any arithmetic on the weights: torch.fx traces them as proxies)
    if fam.gate_up:
        halves = _gate_up_halves(m, projections[0])
        if halves is None:
            return NotImplemented
        w1, wu, b1, bu = halves
    elif fam.gate:
        w1, wu, b1, bu = weight(projections[0]), weight(projections[1]), projections[0].bias, projections[1].bias
    else:
        w1, wu, b1, bu = weight(projections[0]), None, projections[0].bias, None
    down = projections[-1]
    w2, b2 = weight(down), down.bias
    first = (w1,) if wu is None else (w1, wu)
    if not (dropin.fusable_input(x, *first) and (wu is None or wu.shape == w1.shape)
            and isinstance(w2, torch.Tensor) and w2.dim() == 2 and w2.shape[1] == w1.shape[0]
            and all(isinstance(t, torch.Tensor) and t.dtype == x.dtype and t.device == x.device
                    for t in (w2, b1, bu, b2) if t is not None)):
        return NotImplemented
    recompute = parts.get("recompute", "none") if m.training else "none"
    return mlp(x, w1, b1, w2, b2, parts["name"], up_weight=wu, up_bias=bu, dropout=dropout, training=dropout > 0,
               recompute=recompute)


def _fused_encoder_layer(call, *args, **kwargs):
    if len(args) != 1 or kwargs:
        return NotImplemented
    return fused_ff_block(call.module, args[0])


# ---- layers whose own forward runs activation_fn(fc1(x)) (OPT, BART, Whisper) -----------------
# Their forward cannot be replaced by a family's: it is the whole layer. Instead fc1's installed call
# returns act(fc1(x)) in one op when the layer's own forward called it, and activation_fn's passes
# that very tensor through. Only the classes below, whose forward hands fc1's output straight to
# activation_fn (read in their source), and only while fc1 is the layer's plain nn.Linear and
# activation_fn its plain module: fc1 called from anywhere else, wrapped (LoRA) or hooked, and any
# other tensor given to activation_fn, run as they are.
# "Called by the layer's own forward" is read from the calling frames, not from a call installed
# around the layer's forward: gradient checkpointing (transformers' GradientCheckpointingLayer)
# checkpoints the class's forward beneath any instance attribute, and its recomputation during
# backward runs that forward again outside such a call; it must run the same ops as the forward did
# (non-reentrant checkpointing checks that it saves as many tensors).
_LAYER_FFN = {
    "transformers.models.opt.modeling_opt": ("OPTDecoderLayer",),
    "transformers.models.bart.modeling_bart": ("BartEncoderLayer", "BartDecoderLayer"),
    "transformers.models.whisper.modeling_whisper": ("WhisperEncoderLayer", "WhisperDecoderLayer"),
}
# per thread: {id(activation_fn): the activated output fc1 gave the layer's forward, until activation_fn takes it}
_activated = threading.local()
# frames between fc1's fused call and the forward that called fc1: FusedCall.__call__ and
# nn.Module's __call__ machinery (_wrapped_call_impl, _call_impl), with a margin
_CALLER_SEARCH_DEPTH = 6


def _layer_ffn(module) -> bool:
    cls = type(module)
    return cls.__name__ in _LAYER_FFN.get(cls.__module__, ())


@functools.lru_cache(maxsize=None)
def _forward_code(layer_cls):
    """The code of the layer class's own forward, under transformers' wrappers (checkpointing,
    deprecated-argument renaming), which all keep __wrapped__."""
    return inspect.unwrap(layer_cls.forward).__code__


def _calling_layer(fc1, layer_cls):
    """The layer whose own forward called `fc1`: the nearest caller running layer_cls's forward,
    where that forward's self has fc1 as its fc1; else None."""
    code = _forward_code(layer_cls)
    frame = sys._getframe(2)  # (above _fused_layer_fc1 and FusedCall.__call__)
    for _ in range(_CALLER_SEARCH_DEPTH):
        if frame is None:
            return None
        if frame.f_code is code:
            layer = frame.f_locals.get("self")
            return layer if isinstance(layer, nn.Module) and layer._modules.get("fc1") is fc1 else None
        frame = frame.f_back
    return None


def _fused_layer_fc1(call, *args, **kwargs):
    fc1, parts = call.module, call.parts
    if torch.compiler.is_compiling() or len(args) != 1 or kwargs:
        return NotImplemented  # (under torch.compile the layer runs unfused)
    if not (dropin.plain_module(fc1, nn.Linear, fused_forward=True) and dropin.fusable_input(args[0], fc1.weight)):
        return NotImplemented
    layer = _calling_layer(fc1, parts["layer_cls"])
    if layer is None:
        return NotImplemented
    act = layer.__dict__.get("activation_fn", layer._modules.get("activation_fn"))
    # (the activation fuse saw, or a DataParallel replica's copy of it, with its pass-through installed)
    if (act is not parts["act"] and _activation_name(act) != parts["name"]) \
            or not dropin.plain_module(act, type(act), fused_forward=True):
        return NotImplemented
    h = linear_act(args[0], fc1.weight, fc1.bias, parts["name"])
    _activated.__dict__.setdefault("outputs", {})[id(act)] = h
    return h


def _fused_layer_activation(call, *args, **kwargs):
    outputs = getattr(_activated, "outputs", None)
    key = id(call.module)
    if not outputs or len(args) != 1 or kwargs or outputs.get(key) is not args[0]:
        return NotImplemented
    return outputs.pop(key)


def _fuse_layer_ffn(path: str, layer: nn.Module, records: List[FuseRecord]) -> None:
    kind = type(layer).__name__
    fc1, act = layer._modules.get("fc1"), getattr(layer, "activation_fn", None)
    if fc1 is not None and dropin.installed(fc1, "forward"):
        return
    name = _activation_name(act)
    if type(fc1) is not nn.Linear or not isinstance(act, nn.Module) or name is None:
        why = (f"activation {type(act).__name__} has no fastnn equivalent" if name is None
               else f"fc1 is a {type(fc1).__module__}.{type(fc1).__name__}, not an nn.Linear "
               "(fuse again once it is)")
        records.append(FuseRecord(path, kind, False, why))
        return
    parts = {"layer_cls": type(layer), "act": act, "name": name}
    detail = f"fc1 + {name} fused inside the layer's own forward"
    dropin.install(fc1, "forward", _fused_layer_fc1, parts, f"{detail} (elsewhere fc1 is fc1)")
    dropin.install(act, "forward", _fused_layer_activation, parts, f"{detail} (passes fc1's fused output through)")
    records.append(FuseRecord(path, kind, True, detail))


def _sequential_activation(act) -> Optional[str]:
    if not isinstance(act, nn.Module):
        return None
    name = activation_name(act)
    return None if name == "identity" else name


def _fused_sequential(call, *args, **kwargs):
    """nn.Sequential.forward with each plain Linear + known activation module run as one op."""
    if len(args) != 1 or kwargs:
        return NotImplemented
    x = args[0]
    mods = list(call.module._modules.values())
    i = 0
    while i < len(mods):
        if i + 1 < len(mods) and type(mods[i]) is nn.Linear:
            act = mods[i + 1]
            h = fused_linear_act(x, mods[i], nn.Linear, act, _sequential_activation(act))
            if h is not NotImplemented:
                x, i = h, i + 2
                continue
        x = mods[i](x)
        i += 1
    return x


def _fuse_one(path: str, module: nn.Module, records: List[FuseRecord], recompute: str) -> None:
    kind = type(module).__name__
    if isinstance(module, TransformerEncoderLayer):
        return  # fastnn's own layer: fused by its class
    if isinstance(module, nn.TransformerEncoderLayer):
        if type(module)._ff_block is not nn.TransformerEncoderLayer._ff_block:
            records.append(FuseRecord(path, kind, False, "its class overrides _ff_block"))
            return
        if dropin.installed(module, "_ff_block"):
            return
        name = activation_name(module.activation)
        if name is None:
            records.append(FuseRecord(path, kind, False, f"activation {module.activation!r} has no fastnn equivalent"))
            return
        dropin.install(module, "_ff_block", _fused_encoder_layer, {}, f"linear1 + {name}")
        records.append(FuseRecord(path, kind, True, f"linear1 + {name} fused in _ff_block (attention is torch's)"))
        return
    if isinstance(module, nn.Sequential):
        _fuse_sequential(path, module, records)
        return
    for fam in _FAMILIES:
        if not fam.matches(module):
            continue
        if dropin.installed(module, fam.method):
            module.__dict__[fam.method].parts["recompute"] = recompute  # (fusing again sets the level)
            return
        act = getattr(module, fam.act)
        name = _family_activation_name(fam, act)
        if name is None:
            records.append(FuseRecord(path, kind, False, f"{fam.name}: activation {type(act).__name__} "
                                      "has no fastnn equivalent"))
            return
        first = getattr(module, fam.linear or fam.gate or fam.gate_up)
        linear_cls = _linear_class(first)
        if linear_cls is None:
            # (installed, the method would only ever run the module's own: it is no Linear to wrap away)
            proj = getattr(first, "base_layer", first)
            records.append(FuseRecord(path, kind, False, f"{fam.name}: {fam.linear or fam.gate or fam.gate_up} is a "
                                      f"{type(proj).__name__}, not a Linear fastnn reads its weights from"))
            return
        parts = {"family": fam, "act": act, "name": name, "linear_cls": linear_cls, "recompute": recompute}
        detail = f"{fam.name}: {fam.linear or fam.gate_up or fam.gate + ' + ' + fam.up} + {name} fused"
        if fam.down:
            detail += f", with {fam.down} as one block (fastnn.mlp) while it is plain"
            if recompute != "none":
                detail += f", recompute={recompute!r} in training"
        if fam.method != "forward":
            detail += f" (in {fam.method})"
        dropin.install(module, fam.method, _fused_family, parts, detail)
        wrapped = type(first) is not parts["linear_cls"]
        records.append(FuseRecord(path, kind, True, detail + (
            f"; runs unfused while {fam.linear or fam.gate or fam.gate_up} is a {type(first).__name__}"
            if wrapped else "")))
        return
    if _layer_ffn(module):
        _fuse_layer_ffn(path, module, records)
        return
    if all(hasattr(module, a) for a in ("fc1", "fc2", "activation_fn")) and len(module._modules) > 3:
        records.append(FuseRecord(path, kind, False, "fc1 -> activation_fn -> fc2 inside a layer's own forward "
                                  "(OPT/BART/Whisper style): fusing it would replace the whole layer"))


def _fuse_sequential(path: str, seq: nn.Sequential, records: List[FuseRecord]) -> None:
    if type(seq).forward is not nn.Sequential.forward or dropin.installed(seq, "forward"):
        return
    names = list(seq._modules.keys())
    pairs = 0
    for i in range(len(names) - 1):
        lin, act = seq._modules[names[i]], seq._modules[names[i + 1]]
        if type(lin) is not nn.Linear:
            continue
        where = f"{path}.{names[i]}" if path else names[i]
        name = _sequential_activation(act)
        if name is None:
            if isinstance(act, nn.Module) and type(act).__module__.startswith("torch.nn.modules.activation"):
                why = (f"LeakyReLU slope {act.negative_slope} (fastnn's is {activations.LEAKY_SLOPE})"
                       if isinstance(act, nn.LeakyReLU) else f"{type(act).__name__} has no fastnn activation")
                records.append(FuseRecord(where, "Linear", False, why))
            continue
        pairs += 1
        records.append(FuseRecord(where, "Linear", True, f"Linear + {type(act).__name__} run as one op ({name})"))
    if pairs:
        dropin.install(seq, "forward", _fused_sequential, {}, f"{pairs} Linear + activation pair(s)")


def fuse(model: nn.Module, verbose: bool = False, recompute: str = "none") -> nn.Module:
    """Fuse, in place, the Linear + activation patterns fastnn knows; returns the model.

    What was fused and what was left alone (and why) is logged (logger "fastnn"), printed with
    verbose=True, and kept as a list of FuseRecord in `model.fastnn_fuse_report`. Fusing twice
    changes nothing more, but for the level below.
    recompute: the memory level (fastnn.mlp's) of the blocks that run as one fastnn.mlp op, in
    training: "none" keeps what the unfused block keeps, "activation" forms the hidden activation
    again in backward from fc1's pre-activation, "fc1" keeps only the block's input and runs fc1
    and its activation again in backward. Outputs and gradients do not depend on the level (within
    the numerics rule)."""
    if recompute not in RECOMPUTE_LEVELS:
        raise ValueError(f"fastnn.fuse: unknown recompute level {recompute!r}; valid: {', '.join(RECOMPUTE_LEVELS)}")
    records: List[FuseRecord] = []
    for path, module in model.named_modules():
        _fuse_one(path, module, records, recompute)
    model.fastnn_fuse_report = records
    for r in records:
        log.info("%s", r)
        if verbose:
            print(r)
    if not records and verbose:
        print("fastnn.fuse: no known pattern found")
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Remove what fastnn.fuse installed; returns the model."""
    for module in model.modules():
        dropin.uninstall(module)
    return model
