"""fastnn: fused y = act(x @ W^T + b) and its backward for PyTorch, on CPU, CUDA and Triton.

    import fastnn
    y = fastnn.linear_act(x, weight, bias, activation="gelu")
    y = fastnn.linear_glu(x, gate_weight, up_weight, activation="swiglu")
    y = fastnn.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation="gelu", recompute="fc1")

See `python -m fastnn.info` for what this build can do here.
"""
from ._version import __version__
from . import activations, backends, functional, ops  # noqa: F401
from .activations import ACTIVATIONS, GATED
from .backends import BackendUnavailableError
from .functional import linear_act, linear_glu, mlp
from .fuse import fuse, unfuse
from .modules import FusedLinear, FusedMLP, GatedLinear, TransformerEncoderLayer
from . import distributed as _distributed

_distributed.register()  # DTensor sharding rules (tensor parallelism) for the ops above

__all__ = [
    "__version__", "linear_act", "linear_glu", "mlp", "FusedLinear", "GatedLinear", "FusedMLP", "TransformerEncoderLayer",
    "fuse", "unfuse", "ACTIVATIONS", "GATED", "BackendUnavailableError", "functional", "activations", "backends",
]
