"""fastnn's public functions: linear_act, linear_glu and the MLP block built on them, mlp.

Each gives the same result and gradients as its PyTorch composite (act(F.linear(x, W, b)),
act(F.linear(x, Wg, bg)) * F.linear(x, Wu, bu), and fc2 after dropout after either), within the
numerics rule of ../shared/design.md, for x of any number of leading dims (1-D too), any strides,
and zero rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _native, activations, backends, ops  # noqa: F401  (ops registers the torch.library ops)
from .block import MlpFunction
from .dropin import functorch_active

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_tensor(op: str, name: str, t, dims=None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"fastnn.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fastnn.{op}: {name} has dtype {t.dtype}; supported: float32, bfloat16, float16, float64"
        )
    if dims is not None and t.dim() != dims:
        raise ValueError(f"fastnn.{op}: {name} must be {dims}-D, got shape {tuple(t.shape)}")


def _check_same(op: str, x: Tensor, named: list[tuple[str, Optional[Tensor]]]) -> None:
    dtype, device = x.dtype, x.device
    for name, t in named:
        if t is None:
            continue
        if t.dtype != dtype:
            raise TypeError(f"fastnn.{op}: x is {dtype} but {name} is {t.dtype}; they must match")
        if t.device != device:
            raise ValueError(f"fastnn.{op}: x is on {device} but {name} is on {t.device}; they must match")


def _check_linear(op: str, x, weight, bias, wname="weight", bname="bias") -> None:
    _check_tensor(op, "x", x)
    _check_tensor(op, wname, weight, dims=2)
    if x.dim() < 1:
        raise ValueError(f"fastnn.{op}: x must have at least 1 dim (..., in_features), got a scalar")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fastnn.{op}: x has {x.shape[-1]} in_features (shape {tuple(x.shape)}) but {wname} "
            f"expects {weight.shape[1]} (shape {tuple(weight.shape)}, i.e. (out_features, in_features))"
        )
    if bias is not None:
        _check_tensor(op, bname, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"fastnn.{op}: {bname} must have shape ({weight.shape[0]},) to match {wname}'s "
                f"out_features, got {tuple(bias.shape)}"
            )


# one call for "is any autocast on": most calls run without it (torch versions without the call
# ask per device type)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast(*tensors):
    """Under autocast, compute in its dtype, like F.linear does."""
    if not _any_autocast():
        return tensors
    device_type = next(t for t in tensors if t is not None).device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _rows(x: Tensor) -> Tensor:
    """x as (rows, in_features); explicit about sizes so that in_features == 0 works too."""
    dims = x.dim()
    return x if dims == 2 else x.flatten(0, -2) if dims > 1 else x.unsqueeze(0)


def _unflatten(y: Tensor, lead) -> Tensor:
    """y (rows, out) back to (*lead, out). Not a view for 2-D x (y itself) and an unsafe view
    otherwise, as F.linear's own output: modules wrapping fastnn (FSDP2, checkpointing) treat
    views of a module's output specially."""
    if len(lead) == 1:
        return y
    return torch.ops.aten._unsafe_view(y, (*lead, y.shape[-1]))


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# The plain eager call, screened in one function. Right after a large GEMM Python's own code and
# data are out of the caches, and the general path's dozen small functions (checks, autocast,
# backend choice, op choice) cost 100-300 us there: bfloat16 256x768x3072 gelu forward ran 1.18x
# eager through them and 1.33x through this screen (Xeon with AMX, 2 threads, paired). Warm, they
# cost 6-16 us a call (linear_act forward without / with a gradient, forward+backward; 16x64x64
# float32, AMD EPYC Zen 4, 2 threads), which a GPU waits on wherever the host is the bound. The
# screen admits only calls the general path would send to the cpu or cuda backend's eager path
# unchanged; everything else, errors included, takes the general path.
_Parameter = torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling
_dispatch_depth = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack
_forward_ad = torch.autograd.forward_ad
_jit_tracing = torch._C._is_tracing
_grad_enabled = torch.is_grad_enabled
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _plain_call(backend, x, weights, biases):
    """The backend a plain eager call goes to straight away, "cpu" or "cuda"; None: the general
    path decides. Plain: x, the weights (out, in) and the biases (out,) or None are plain tensors of
    one dtype that backend runs, on one device (the CPU; a CUDA device with fastnn._cuda loaded),
    with matching shapes; nothing (compile, export, a dispatch mode, torch.func, forward AD, jit
    tracing, autocast) makes fastnn take another path; and that backend is asked for or auto's
    choice (on CUDA, auto puts the cuda backend first for its dtypes: backends.auto_order)."""
    if _is_compiling() or type(x) is not Tensor or x.dim() < 1:
        return None
    if x.is_cpu:
        name, device, runs = "cpu", None, x.dtype in FLOAT_DTYPES and _native._C is not None
    elif x.is_cuda:
        name, device, runs = "cuda", x.device, x.dtype in _CUDA_DTYPES and _native.cuda_module() is not None
    else:
        return None
    if (not runs or (backend != "auto" and backend != name)
            or not _plain_params(x.dtype, x.shape[-1], weights, biases, device)
            or _any_autocast() or _dispatch_depth() or _functorch_level() is not None
            or _forward_ad._current_level >= 0 or _jit_tracing()):
        return None
    return name


def _plain_params(dtype, in_features, weights, biases, device=None) -> bool:
    """Whether the weights are plain tensors (out, in_features) and the biases (out,) or None, all
    of one dtype and one `out`, on the CPU (device None) or on `device`."""
    out = weights[0].shape[0]
    for w in weights:
        if ((type(w) is not Tensor and type(w) is not _Parameter) or (not w.is_cpu if device is None else w.device != device)
                or w.dtype != dtype or w.dim() != 2 or w.shape[0] != out or w.shape[1] != in_features):
            return False
    for b in biases:
        if b is not None and ((type(b) is not Tensor and type(b) is not _Parameter)
                              or (not b.is_cpu if device is None else b.device != device)
                              or b.dtype != dtype or b.dim() != 1 or b.shape[0] != out):
            return False
    return True


def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "gelu", *,
               backend: str = "auto") -> Tensor:
    """act(x @ weight^T + bias) in one fused op, with its own backward.

    x: (..., in_features); weight: (out_features, in_features), as nn.Linear; bias: (out_features,)
    or None. activation: one of fastnn.activations.ACTIVATIONS. backend: "auto", "cuda", "triton",
    "cpu" or "torch"; a named backend that cannot serve the call raises BackendUnavailableError.
    Backward keeps x and weight (as F.linear does) plus, per output element, nothing (identity),
    1 bit (relu, leaky_relu) or one element of the input dtype (the others: the pre-activation).
    """
    act = activations.ACTIVATIONS.get(activation) if type(activation) is str else None
    plain = _plain_call(backend, x, (weight,), (bias,)) if act is not None else None
    if plain is not None:
        flat = x.dim() == 2
        x2 = x if flat else _rows(x)
        # (_needs_grad spelled out: this path's Python calls are its cost, see _plain_call)
        if _grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
            y = ops.LinearActFunction.apply(x2, weight, bias, activation, plain, True)
        else:
            y = backends.BACKENDS[plain].linear_act_y(x2, weight, bias, act)
        return y if flat else _unflatten(y, x.shape[:-1])
    act = activations.get(activation)
    _check_linear("linear_act", x, weight, bias)
    _check_same("linear_act", x, [("weight", weight), ("bias", bias)])
    x, weight, bias = _autocast(x, weight, bias)
    name = backends.resolve(backend, "linear_act", x, [weight], act, (bias,))
    if name == "torch":
        return backends.BACKENDS["torch"].linear_act(x, weight, bias, act)
    lead = x.shape[:-1]
    x2 = _rows(x)
    save = _needs_grad(x, weight, bias)
    if not ops.use_ops(x2, weight, bias):
        # with no gradient to give, the backend's forward alone: autograd.Function.apply adds only
        # its own cost, which right after a large GEMM (caches cold for Python) was 2-4% of a
        # bfloat16 256x768x3072 call on a 2-core AMD EPYC
        y = (ops.LinearActFunction.apply(x2, weight, bias, activation, name, save) if save
             else backends.BACKENDS[name].linear_act_y(x2, weight, bias, act))
    elif name == "triton":
        y, _ = torch.ops.fastnn.triton_linear_act_fwd(x2, weight, bias, activation, save)
    else:
        y, _ = torch.ops.fastnn.linear_act_fwd(x2, weight, bias, activation, name, save)
    return _unflatten(y, lead)


def linear_glu(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Optional[Tensor] = None,
               up_bias: Optional[Tensor] = None, activation: str = "swiglu", *,
               backend: str = "auto") -> Tensor:
    """The gated unit act(x @ gate_weight^T + gate_bias) * (x @ up_weight^T + up_bias), fused.

    activation: "swiglu" (silu gate), "geglu" (exact gelu), "geglu_tanh" or "reglu" (relu).
    The gate and up weights stay two tensors, so fastnn.fuse can share a model's existing
    parameters. Backward keeps x, both weights and both pre-activations (2 elements per output).
    """
    gate = activations.GATED.get(activation) if type(activation) is str else None
    plain = _plain_call(backend, x, (gate_weight, up_weight), (gate_bias, up_bias)) if gate is not None else None
    if plain is not None:
        x2 = x if x.dim() == 2 else _rows(x)
        if _needs_grad(x, gate_weight, up_weight, gate_bias, up_bias):
            y = ops.LinearGluFunction.apply(x2, gate_weight, up_weight, gate_bias, up_bias, activation, plain, True)
        else:
            y = backends.BACKENDS[plain].linear_glu_y(x2, gate_weight, up_weight, gate_bias, up_bias,
                                                      activations.ACTIVATIONS[gate])
        return y if x.dim() == 2 else _unflatten(y, x.shape[:-1])
    gate_act = activations.get_gated(activation)
    _check_linear("linear_glu", x, gate_weight, gate_bias, "gate_weight", "gate_bias")
    _check_linear("linear_glu", x, up_weight, up_bias, "up_weight", "up_bias")
    if gate_weight.shape != up_weight.shape:
        raise ValueError(
            f"fastnn.linear_glu: gate_weight {tuple(gate_weight.shape)} and up_weight "
            f"{tuple(up_weight.shape)} must have the same shape"
        )
    _check_same("linear_glu", x, [("gate_weight", gate_weight), ("up_weight", up_weight),
                                  ("gate_bias", gate_bias), ("up_bias", up_bias)])
    x, gate_weight, up_weight, gate_bias, up_bias = _autocast(x, gate_weight, up_weight, gate_bias, up_bias)
    name = backends.resolve(backend, "linear_glu", x, [gate_weight, up_weight], gate_act, (gate_bias, up_bias))
    if name == "torch":
        return backends.BACKENDS["torch"].linear_glu(x, gate_weight, up_weight, gate_bias, up_bias, gate_act)
    lead = x.shape[:-1]
    x2 = _rows(x)
    save = _needs_grad(x, gate_weight, up_weight, gate_bias, up_bias)
    if not ops.use_ops(x2, gate_weight, up_weight, gate_bias, up_bias):
        # (no gradient to give: the backend's forward alone, as linear_act)
        y = (ops.LinearGluFunction.apply(x2, gate_weight, up_weight, gate_bias, up_bias, activation, name, save)
             if save else backends.BACKENDS[name].linear_glu_y(x2, gate_weight, up_weight, gate_bias, up_bias,
                                                              gate_act))
    elif name == "triton":
        y, _, _ = torch.ops.fastnn.triton_linear_glu_fwd(x2, gate_weight, up_weight, gate_bias, up_bias,
                                                         activation, save)
    else:
        y, _, _ = torch.ops.fastnn.linear_glu_fwd(x2, gate_weight, up_weight, gate_bias, up_bias,
                                                  activation, name, save)
    return _unflatten(y, lead)


RECOMPUTE_LEVELS = ("none", "activation", "fc1")


def mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
        activation: str = "gelu", *, up_weight: Optional[Tensor] = None, up_bias: Optional[Tensor] = None,
        dropout: float = 0.0, training: bool = True, recompute: str = "none", backend: str = "auto") -> Tensor:
    """An MLP block, fc2(dropout(act(fc1(x)))), with fc1 and its activation fused.

    Gated activations (swiglu, geglu, geglu_tanh, reglu): fc1_weight / fc1_bias are the gate
    projection and up_weight / up_bias the up projection (up_weight is required then, and only then).
    dropout: the probability of F.dropout between the activation and fc2, applied when training is
    True, with PyTorch's semantics and random stream (seeded runs reproduce).
    recompute, what backward keeps beyond the weights (memory levels):
      "none":       x, fc1's saved tensor (the pre-activation, or a 1-bit mask for relu and
                    leaky_relu; two pre-activations for a gated unit), the hidden activation fc2
                    reads and the dropout mask;
      "activation": x and fc1's pre-activation(s); backward forms the hidden activation again
                    (relu and leaky_relu keep what "none" keeps: their mask cannot give it back).
                    Where the block runs as PyTorch's composite instead of fastnn's block op
                    (dropout in training, torch.compile, tensor subclasses, torch.func) this level
                    keeps what "none" keeps;
      "fc1":        x only (and a copy of fc1's biases, as small as a row); backward runs fc1 and
                    the activation again. With dropout in training (and under torch.compile,
                    tensor subclasses) this is torch.utils.checkpoint of the block, which replays
                    the random state, so the masks are the forward's.
    Eagerly and without dropout in training, the block is one autograd op (fastnn/block.py) on the
    backend: fc2 runs there too, and the hidden gradient goes straight into fc1's act' pass.
    """
    gated = activation in activations.GATED
    plain = None
    if ((gated or activation in activations.ACTIVATIONS) and (up_weight is not None) == gated
            and (up_bias is None or gated) and (dropout == 0.0 or (not training and 0.0 < dropout <= 1.0))
            and recompute in RECOMPUTE_LEVELS):
        # (a plain eager call, as linear_act's, screened once for the whole block; dropout that
        # would run goes the general way)
        plain = _plain_call(backend, x, (fc1_weight, up_weight) if gated else (fc1_weight,), (fc1_bias, up_bias))
        if plain is not None and not _plain_params(x.dtype, fc1_weight.shape[0], (fc2_weight,), (fc2_bias,),
                                                   None if plain == "cpu" else x.device):
            plain = None
    if plain is not None:
        x2 = x if x.dim() == 2 else _rows(x)
        if _needs_grad(x, fc1_weight, fc1_bias, up_weight, up_bias, fc2_weight, fc2_bias):
            y = MlpFunction.apply(x2, fc1_weight, fc1_bias, up_weight, up_bias, fc2_weight, fc2_bias, activation,
                                  plain, recompute)
        else:
            be = backends.BACKENDS[plain]
            h = (be.linear_glu_y(x2, fc1_weight, up_weight, fc1_bias, up_bias, activations.get_gated(activation))
                 if gated else be.linear_act_y(x2, fc1_weight, fc1_bias, activations.ACTIVATIONS[activation]))
            y = be.linear_act_y(h, fc2_weight, fc2_bias, activations.ACTIVATIONS["identity"])
        return y if x.dim() == 2 else _unflatten(y, x.shape[:-1])
    if gated:
        act = activations.get_gated(activation)
        if up_weight is None:
            raise ValueError(f"fastnn.mlp: the gated activation {activation!r} needs up_weight (and up_bias if any)")
    else:
        act = activations.get(activation)
        if up_weight is not None or up_bias is not None:
            raise ValueError(f"fastnn.mlp: up_weight / up_bias are for gated activations, not {activation!r}")
    if recompute not in RECOMPUTE_LEVELS:
        raise ValueError(f"fastnn.mlp: unknown recompute level {recompute!r}; valid: {', '.join(RECOMPUTE_LEVELS)}")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"fastnn.mlp: dropout probability has to be between 0 and 1, but got {dropout}")
    _check_linear("mlp", x, fc1_weight, fc1_bias, "fc1_weight", "fc1_bias")
    hidden = fc1_weight.shape[0]
    if gated and tuple(up_weight.shape) != tuple(fc1_weight.shape):
        raise ValueError(f"fastnn.mlp: up_weight has shape {tuple(up_weight.shape)} but fc1_weight (the gate) "
                         f"has {tuple(fc1_weight.shape)}; they must match")
    _check_tensor("mlp", "fc2_weight", fc2_weight, dims=2)
    if fc2_weight.shape[1] != hidden:
        raise ValueError(f"fastnn.mlp: fc2_weight has {fc2_weight.shape[1]} in_features (shape "
                         f"{tuple(fc2_weight.shape)}) but fc1 gives {hidden} hidden features")
    if fc2_bias is not None:
        _check_tensor("mlp", "fc2_bias", fc2_bias)
        if tuple(fc2_bias.shape) != (fc2_weight.shape[0],):
            raise ValueError(f"fastnn.mlp: fc2_bias must have shape ({fc2_weight.shape[0]},) to match "
                             f"fc2_weight's out_features, got {tuple(fc2_bias.shape)}")
    _check_same("mlp", x, [("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias), ("fc2_weight", fc2_weight),
                           ("fc2_bias", fc2_bias), ("up_weight", up_weight), ("up_bias", up_bias)])
    params = _autocast(x, fc1_weight, fc1_bias, up_weight, up_bias, fc2_weight, fc2_bias)
    x, fc1_weight, fc1_bias, up_weight, up_bias, fc2_weight, fc2_bias = params
    name = backends.resolve(backend, "mlp", x, [fc1_weight, fc2_weight], act,
                            (fc1_bias, up_weight, up_bias, fc2_bias))
    drop = dropout > 0.0 and training

    one_op = (not drop and _needs_grad(x, *params[1:]) and not ops.use_ops(x, *params[1:]) and not functorch_active()
              and not torch.jit.is_tracing())

    def block(x: Tensor, level: str) -> Tensor:
        if one_op:
            y = MlpFunction.apply(_rows(x), fc1_weight, fc1_bias, up_weight, up_bias, fc2_weight, fc2_bias,
                                  activation, name, level)
            return _unflatten(y, x.shape[:-1])
        if gated:
            h = linear_glu(x, fc1_weight, up_weight, fc1_bias, up_bias, activation, backend=backend)
        else:
            h = linear_act(x, fc1_weight, fc1_bias, activation, backend=backend)
        if drop:
            h = torch.nn.functional.dropout(h, dropout, True)
        return linear_act(h, fc2_weight, fc2_bias, "identity", backend=backend)

    # the one op keeps x alone itself; the composed ops need checkpoint (torch.func's transforms
    # refuse its saved-tensor hooks: there the block keeps what it uses)
    if recompute == "fc1" and not one_op and _needs_grad(x, *params[1:]) and not functorch_active():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, x, "none", use_reentrant=False)
    return block(x, recompute)
