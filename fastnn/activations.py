"""The activations of fastnn: names, the Python reference of each and of its derivative.

This is the reference that the C++ functors (csrc/include/fastnn/activations.h) and the Triton
functions (triton_kernels/activations.py) are tested against. `code` is the C++ enum value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

LEAKY_SLOPE = 0.01


@dataclass(frozen=True)
class Activation:
    name: str
    code: int  # fastnn::Act in activations.h
    fn: Callable[[torch.Tensor], torch.Tensor]  # act(z), in PyTorch ops
    grad: Callable[[torch.Tensor], torch.Tensor]  # d act / dz, in PyTorch ops
    # What backward needs besides dY: "nothing" (identity), "mask" (the sign of z, 1 bit per
    # element: relu and leaky_relu) or "preact" (z itself, in the input dtype).
    saves: str
    # Whether PyTorch's backward of this activation ends in threshold_backward (relu, squared_relu).
    threshold: bool = False
    # For an activation that is one PyTorch op: that op's own backward kernel, dY * act'(z) as eager
    # autograd computes it (threshold_backward, gelu_backward, ...): one pass that computes 16-bit
    # inputs in float32 and rounds once, where act' formed from `grad` takes a dozen float32 passes
    # (gelu, bfloat16 2048 x 3072 on a 2-core AMD EPYC: 2.5 ms against 95). None for the composites.
    torch_backward: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None

    def grad_times(self, dy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """dY * act'(z) as PyTorch's backward forms it (grad_times in activations.h): through a
        threshold it is exactly 0 where z <= 0 whatever dY is, where the product would give NaN
        for an inf or NaN dY (a float16 overflow)."""
        g = dy * self.grad(z)
        return torch.ops.aten.threshold_backward(g, z, 0) if self.threshold else g


def _gelu_grad(z):
    return 0.5 * torch.erfc(-z * (1 / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


_K0, _K1 = math.sqrt(2 / math.pi), 0.044715


def _gelu_tanh_grad(z):
    t = torch.tanh(_K0 * (z + _K1 * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _K0 * (1 + 3 * _K1 * z * z)


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


QUICK_GELU_SCALE = 1.702  # quick_gelu(z) = z sigmoid(1.702 z): CLIP's activation


def _quick_gelu(z):
    return z * torch.sigmoid(QUICK_GELU_SCALE * z)


def _quick_gelu_grad(z):
    s = torch.sigmoid(QUICK_GELU_SCALE * z)
    return s * (1 + QUICK_GELU_SCALE * z * (1 - s))


def _sigmoid_grad(z):
    s = torch.sigmoid(z)
    return s * (1 - s)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation("identity", 0, lambda z: z, torch.ones_like, "nothing"),
        # relu'(z) = 0 where z <= 0, else 1, NaN included: torch's threshold_backward
        Activation("relu", 1, F.relu, lambda z: (~(z <= 0)).to(z.dtype), "mask", threshold=True,
                   torch_backward=lambda dy, z: torch.ops.aten.threshold_backward(dy, z, 0)),
        Activation("gelu", 2, F.gelu, _gelu_grad, "preact", torch_backward=torch.ops.aten.gelu_backward),
        Activation("gelu_tanh", 3, lambda z: F.gelu(z, approximate="tanh"), _gelu_tanh_grad, "preact",
                   torch_backward=lambda dy, z: torch.ops.aten.gelu_backward(dy, z, approximate="tanh")),
        Activation("silu", 4, F.silu, _silu_grad, "preact", torch_backward=torch.ops.aten.silu_backward),
        # (sigmoid's and tanh's backward kernels take the output, as eager keeps it)
        Activation("sigmoid", 5, torch.sigmoid, _sigmoid_grad, "preact",
                   torch_backward=lambda dy, z: torch.ops.aten.sigmoid_backward(dy, torch.sigmoid(z))),
        Activation("tanh", 6, torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, "preact",
                   torch_backward=lambda dy, z: torch.ops.aten.tanh_backward(dy, torch.tanh(z))),
        Activation(
            "leaky_relu", 7, lambda z: F.leaky_relu(z, LEAKY_SLOPE),
            lambda z: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, LEAKY_SLOPE)), "mask",
            torch_backward=lambda dy, z: torch.ops.aten.leaky_relu_backward(dy, z, LEAKY_SLOPE, False),
        ),
        Activation("squared_relu", 8, lambda z: torch.square(F.relu(z)), lambda z: 2 * F.relu(z), "preact",
                   threshold=True),
        Activation("quick_gelu", 9, _quick_gelu, _quick_gelu_grad, "preact"),
    ]
}

# Gated units for linear_glu: name -> the activation applied to the gate.
GATED: dict[str, str] = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}


def get(name: str) -> Activation:
    """The activation called `name`; a ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        valid = ", ".join(ACTIVATIONS)
        hint = f" ({name!r} is gated: use linear_glu)" if name in GATED else ""
        raise ValueError(f"unknown activation {name!r}{hint}; valid activations: {valid}")
    return ACTIVATIONS[name]


def get_gated(name: str) -> Activation:
    """The gate activation of the gated unit `name`; a ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in GATED:
        valid = ", ".join(GATED)
        hint = f" ({name!r} is not gated: use linear_act)" if name in ACTIVATIONS else ""
        raise ValueError(f"unknown gated activation {name!r}{hint}; valid gated activations: {valid}")
    return ACTIVATIONS[GATED[name]]


def saved_bytes_per_element(name: str, dtype: torch.dtype) -> float:
    """Bytes that backward keeps per output element, beyond the inputs x and weight."""
    saves = get(name).saves
    if saves == "nothing":
        return 0.0
    if saves == "mask":
        return 1 / 8
    return torch.empty((), dtype=dtype).element_size()
