"""Drop-in modules: FusedLinear, GatedLinear, FusedMLP and TransformerEncoderLayer."""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import activations
from .functional import linear_act, linear_glu


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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class GatedLinear(nn.Module):
    """The gated unit act(x @ Wg^T + bg) * (x @ Wu^T + bu) over two nn.Linear projections.

    Layout: submodules `gate_proj` and `up_proj` (nn.Linear, in_features -> out_features), so the
    state_dict keys are gate_proj.weight, up_proj.weight (and .bias), as in LLaMA-style MLPs.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "swiglu",
                 device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        activations.get_gated(activation)
        self.gate_proj = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_linears(cls, gate_proj: nn.Linear, up_proj: nn.Linear, activation: str,
                     backend: str = "auto") -> "GatedLinear":
        """A GatedLinear that shares the two given projections (and so their parameters)."""
        activations.get_gated(activation)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.gate_proj, fused.up_proj = gate_proj, up_proj
        fused.activation, fused.backend = activation, backend
        return fused

    def forward(self, x: Tensor) -> Tensor:
        return linear_glu(x, self.gate_proj.weight, self.up_proj.weight, self.gate_proj.bias, self.up_proj.bias,
                          self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class FusedMLP(nn.Module):
    """fc1 -> activation -> dropout -> fc2, with fc1 and its activation fused.

    With a gated activation (swiglu, geglu, geglu_tanh, reglu), fc1 is a GatedLinear: keys
    fc1.gate_proj.* and fc1.up_proj.*; otherwise fc1 is a FusedLinear: keys fc1.weight, fc1.bias.
    fc2 is an nn.Linear (fc2.weight, fc2.bias).

    recompute=True keeps only the block input for backward and recomputes fc1 and the activation
    there (activation checkpointing of the block). Per token that saves what the block would
    otherwise keep: the hidden activation fc2 reads (hidden_features elements), fc1's
    pre-activation (hidden_features elements, or hidden_features / 8 bytes for relu and leaky_relu;
    twice hidden_features elements for a gated unit) and the dropout mask (hidden_features bytes,
    when dropout > 0). For bert-base (hidden 3072, bfloat16, gelu) that is 12 KiB per token.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None,
                 activation: str = "gelu", bias: bool = True, dropout: float = 0.0, device=None, dtype=None,
                 recompute: bool = False, backend: str = "auto"):
        super().__init__()
        out_features = out_features if out_features is not None else in_features
        if activation in activations.GATED:
            self.fc1 = GatedLinear(in_features, hidden_features, bias, activation, device, dtype, backend)
        else:
            self.fc1 = FusedLinear(in_features, hidden_features, bias, activation, device, dtype, backend)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.recompute = recompute

    def _block(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.fc1(x)))

    def forward(self, x: Tensor) -> Tensor:
        if self.recompute and torch.is_grad_enabled() and self.training:
            return checkpoint(self._block, x, use_reentrant=False)
        return self._block(x)

    def extra_repr(self) -> str:
        return f"activation={self.activation}, recompute={self.recompute}"


# torch.nn activation callables and modules that have a fastnn name
def activation_name(act) -> Optional[str]:
    """fastnn's name for a torch activation given as a string, function or module; None if unknown."""
    if isinstance(act, str):
        return act if act in activations.ACTIVATIONS else None
    if act is F.relu or act is torch.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu:
        return "gelu"
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if act is F.silu or isinstance(act, nn.SiLU):
        return "silu"
    if act is torch.sigmoid or act is F.sigmoid or isinstance(act, nn.Sigmoid):
        return "sigmoid"
    if act is torch.tanh or act is F.tanh or isinstance(act, nn.Tanh):
        return "tanh"
    if isinstance(act, nn.LeakyReLU) and math.isclose(act.negative_slope, activations.LEAKY_SLOPE):
        return "leaky_relu"
    if isinstance(act, nn.Identity):
        return "identity"
    return None


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer with the same signature, defaults and state_dict keys,
    attention through F.scaled_dot_product_attention and the feed-forward block fused
    (linear1 + activation in one op). A state_dict of torch's layer loads into it and gives the
    same outputs and gradients; it stacks inside torch.nn.TransformerEncoder. An activation that
    fastnn does not know (a custom callable) runs unfused, exactly as in torch's layer.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        self._setup_fused(activation)

    def _setup_fused(self, activation) -> None:
        self.fused_activation = activation_name(activation)
        # torch's fast paths (the native encoder kernel, nested tensors in TransformerEncoder)
        # would bypass this forward: this flag is what they check first
        self.activation_relu_or_gelu = False

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> "TransformerEncoderLayer":
        """A fastnn layer sharing `layer`'s submodules (and so its parameters)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name, child in layer.named_children():
            setattr(fused, name, child)
        fused.norm_first = layer.norm_first
        fused.activation = layer.activation
        fused._setup_fused(layer.activation)
        return fused

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool = False) -> Tensor:
        attn = self.self_attn
        if not self.self_attn.batch_first:
            x = x.transpose(0, 1)
        batch, length, d_model = x.shape
        heads = attn.num_heads
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, heads, d_model // heads).transpose(1, 2) for t in (q, k, v))
        mask = _sdpa_mask(attn_mask, key_padding_mask, batch, heads, length, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=attn.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None)
        out = out.transpose(1, 2).reshape(batch, length, d_model)
        out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
        if not self.self_attn.batch_first:
            out = out.transpose(0, 1)
        return self.dropout1(out)

    def _ff_block(self, x: Tensor) -> Tensor:
        if self.fused_activation is None:
            h = self.activation(self.linear1(x))
        else:
            h = linear_act(x, self.linear1.weight, self.linear1.bias, self.fused_activation)
        return self.dropout2(self.linear2(self.dropout(h)))


def _sdpa_mask(attn_mask, key_padding_mask, batch, heads, length, dtype) -> Optional[Tensor]:
    """nn.MultiheadAttention's masks (True or -inf = do not attend) as one additive float mask
    for scaled_dot_product_attention, shaped (batch, heads, L, S)."""
    if attn_mask is None and key_padding_mask is None:
        return None
    mask = torch.zeros((batch, heads, length, length), dtype=dtype, device=(
        attn_mask if attn_mask is not None else key_padding_mask).device)
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        mask = mask + (m.reshape(batch, heads, length, length) if m.dim() == 3 else m)
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros_like(k, dtype=dtype).masked_fill(k, float("-inf"))
        mask = mask + k.to(dtype)[:, None, None, :]
    return mask
