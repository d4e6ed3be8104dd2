"""What keeps a fused module indistinguishable from what it replaces.

fastnn fuses a projection and its activation only while calling them would run nothing but their
classes' own forward. Anything else a user or a library put there (LoRA and other wrappers,
quantised or parametrised layers, FSDP2, forward or backward hooks on the module or global ones,
accelerate's offloading hooks, an instance-level forward) makes the call do more, and then fastnn
calls the modules themselves, unfused but right. The checks are a few attribute reads per call.
One kind of hook is known to commute with the fusion: tensor parallelism's ColwiseParallel
(`ColwiseCall`), whose hooks fastnn calls around the fused op.

`FusedCall` is what fastnn.fuse installs on a module instance in place of one of its methods
(forward, or _ff_block / ff_chunk where the model's own forward calls those): the module keeps
its class, children, parameters, hooks and train/eval state, so everything around it sees the
module it had. `fastnn.unfuse` takes it away again. Beside it go a `ReplicateForDataParallel`,
so that nn.DataParallel's replicas of the module get fused calls of their own, and an
`UnfuseForScripting`, so that torch.jit.script compiles the module's own class.
"""
from __future__ import annotations

import copy
import inspect
import logging

import torch
import torch.nn.modules.module as _torch_module
from torch import Tensor, nn

log = logging.getLogger("fastnn")


def global_hooks_present() -> bool:
    """Whether hooks registered for every module (register_module_forward_hook, ...) exist: they
    would fire for the inner modules of an unfused model, so nothing is fused while they do."""
    m = _torch_module  # (four reads, no generator: this runs several times in every fused call)
    return bool(getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None)
                or getattr(m, "_global_backward_hooks", None) or getattr(m, "_global_backward_pre_hooks", None))


def plain_module(module, cls, fused_forward: bool = False) -> bool:
    """Whether calling `module` runs exactly `cls.forward`: its type is `cls` itself (not a
    wrapper, subclass or parametrised class), it has no hooks and no instance-level forward, and
    no global module hooks exist (they would fire for it).
    fused_forward: the module's forward is one fastnn installed (a FusedCall over nothing else)."""
    forward = module.__dict__.get("forward")
    own_forward = (isinstance(forward, FusedCall) and forward.original is None) if fused_forward else forward is None
    return (type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks
            and not module._backward_hooks and not module._backward_pre_hooks and own_forward
            and not global_hooks_present())


class PlainCall:
    """Calling a plain module (see plain_module): nothing around its class's own forward."""

    key = None

    def enter(self, x):
        return x

    def leave(self, x, y):
        return y


class ColwiseCall:
    """Calling a module that tensor parallelism's ColwiseParallel sharded: its two hooks around
    the class's own forward, and nothing else.

    ColwiseParallel shards an nn.Linear's weight and bias by output feature (DTensor parameters)
    and installs a forward pre-hook (x to a replicated DTensor) and a forward hook (the output,
    sharded by feature, to the layout asked for, then to a local tensor). Both only move data, so
    they commute with an elementwise activation: leave(act(linear(enter(x)))) is exactly
    act(module(x)), and fastnn can fuse the activation into the local shard's GEMM (the DTensor
    sharding rules of fastnn/distributed.py). The hooks themselves are called, so what the
    module does with its input and output stays torch's own."""

    def __init__(self, module, pre_hook, hook, key):
        self.module, self._pre_hook, self._hook = module, pre_hook, hook
        self.key = key  # (mesh, input layouts, output layouts, use_local_output): same key, same hooks

    def enter(self, x):
        args = self._pre_hook(self.module, (x,))
        if args is None:
            return x
        return args[0] if isinstance(args, tuple) else args

    def leave(self, x, y):
        out = self._hook(self.module, (x,), y)
        return y if out is None else out


def _closure_value(fn, cls):
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, cls):
            return value
    return None


def colwise_call(module, cls):
    """A ColwiseCall when calling `module` runs exactly cls.forward between ColwiseParallel's
    two hooks (torch.distributed.tensor.parallel, installed by parallelize_module); else None.
    The hooks are recognised by the ColwiseParallel functions inside them (DTensor's
    distribute_module wraps them in a lambda), so any other hook, or a layout that does not
    commute with an elementwise activation (a Partial output), leaves the module unfused.
    Under torch.compile it is None too: the module runs as itself there (Dynamo traces the hooks,
    and cannot trace the inspection of their closures)."""
    pre_hooks, hooks = module._forward_pre_hooks, module._forward_hooks
    if (torch.compiler.is_compiling() or global_hooks_present() or type(module) is not cls or len(pre_hooks) != 1 or len(hooks) != 1 or module._backward_hooks
            or module._backward_pre_hooks or "forward" in module.__dict__ or module._forward_pre_hooks_with_kwargs
            or module._forward_hooks_with_kwargs or getattr(module, "_forward_hooks_always_called", None)):
        return None
    try:
        from torch.distributed.tensor import Partial
        from torch.distributed.tensor.parallel import ColwiseParallel
    except ImportError:
        return None
    import functools

    (pre_hook,), (hook,) = pre_hooks.values(), hooks.values()
    prepare_input = _closure_value(pre_hook, functools.partial)
    prepare_output = _closure_value(hook, functools.partial)
    if (prepare_input is None or prepare_output is None
            or prepare_input.func is not ColwiseParallel._prepare_input_fn
            or prepare_output.func is not ColwiseParallel._prepare_output_fn
            or prepare_input.keywords or prepare_output.keywords or len(prepare_output.args) != 2):
        return None
    output_layouts, use_local_output = prepare_output.args
    if any(isinstance(p, Partial) for p in output_layouts):
        return None
    from torch.distributed.device_mesh import DeviceMesh

    mesh = _closure_value(pre_hook, DeviceMesh)
    if mesh is None or _closure_value(hook, DeviceMesh) is not mesh:
        return None
    return ColwiseCall(module, pre_hook, hook, (mesh, prepare_input.args, tuple(output_layouts), use_local_output))


_PLAIN = PlainCall()


def projection_call(module, cls):
    """What calling a projection runs around cls.forward, where fastnn can fuse through it: a
    PlainCall (nothing: plain_module), a ColwiseCall (tensor parallelism's two hooks), or None
    (anything else: the module itself must run)."""
    return _PLAIN if plain_module(module, cls) else colwise_call(module, cls)


def plain_callable(fn) -> bool:
    """An activation given as a function is plain; as a module, when plain_module of its own type."""
    return not isinstance(fn, nn.Module) or plain_module(fn, type(fn))


def fusable_input(x, *weights) -> bool:
    """Inputs the fused op takes exactly as F.linear would; anything else (a dtype or device
    mismatch, wrong in_features, a non-tensor) goes to the module itself, whose error is the one
    the user would have seen without fastnn."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        return False
    return all(isinstance(w, Tensor) and w.dim() == 2 and w.dtype == x.dtype and w.device == x.device
               and w.shape[1] == x.shape[-1] for w in weights)


class FusedCall:
    """A fused method installed on one module instance (as `module.<method>`).

    Calls `fused(self, *args, **kwargs)`, a module-level function that returns NotImplemented when
    some part is no longer plain (see the module docstring); then the module's own method runs.
    `parts` holds what `fused` needs that the module does not (the activation's fastnn name, the
    activation object and projection classes seen when fusing). Picklable and deep-copyable with
    the module.
    """

    def __init__(self, module: nn.Module, method: str, fused, parts: dict, detail: str):
        self.module = module
        self.method = method
        self.fused = fused
        self.parts = parts
        self.detail = detail
        # an instance-level override already there (another library's hook): kept and called
        self.original = module.__dict__.get(method)

    def unfused(self, *args, **kwargs):
        if self.original is not None:
            return self.original(*args, **kwargs)
        return getattr(type(self.module), self.method)(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if not global_hooks_present():
            out = self.fused(self, *args, **kwargs)
            if out is not NotImplemented:
                return out
        return self.unfused(*args, **kwargs)

    @property
    def __signature__(self):
        # the original method's, for code that inspects it (Trainer drops unused columns by it)
        sig = inspect.signature(getattr(type(self.module), self.method))
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    @property
    def __code__(self):
        # the original method's, for code that reads it off `module.forward` (torch.export names its
        # shape environment after it); deliberately no __func__ / __self__, which code takes to mean
        # "call the class's function" and so would step around the fused call
        return inspect.unwrap(getattr(type(self.module), self.method)).__code__

    def __repr__(self):
        return f"<fastnn fused {type(self.module).__name__}.{self.method}: {self.detail}>"

    def for_replica(self, replica: nn.Module) -> "FusedCall":
        """This call, installed on `replica` (see ReplicateForDataParallel)."""
        call = copy.copy(self)
        call.module = replica
        return call


class _BesideFusedCalls:
    """A method of torch's protocol for modules (`name`), installed on a module beside its fused
    calls; an instance-level override that was there is kept and called."""
    name = None

    def __init__(self, module: nn.Module, original=None):
        self.module = module
        self.original = original

    def for_replica(self, replica: nn.Module):
        return type(self)(replica, self.original)


class ReplicateForDataParallel(_BesideFusedCalls):
    """`module._replicate_for_data_parallel`. nn.DataParallel (through torch.nn.parallel.replicate)
    makes each replica from a copy of the module's __dict__, fused calls included, and those would
    run the original module, whose parameters are on the first device, for every replica. This
    gives each replica fused calls of its own. The replica's children, parameters and buffers are
    set by replicate afterwards; the fused calls read them at each call."""
    name = "_replicate_for_data_parallel"

    def __call__(self):
        if self.original is not None:
            replica = self.original()
        else:
            replica = type(self.module)._replicate_for_data_parallel(self.module)
        for name, value in list(replica.__dict__.items()):
            if isinstance(value, (FusedCall, _BesideFusedCalls)):
                replica.__dict__[name] = value.for_replica(replica)
        return replica


class UnfuseForScripting(_BesideFusedCalls):
    """`module.__prepare_scriptable__`, which torch.jit.script calls on every module before it
    compiles their classes' methods. A FusedCall is no method TorchScript can compile (it would
    stop with "'FusedCall' object has no attribute '__globals__'"), so this takes fastnn's calls off
    the module: the scripted module is torch's own, unfused, and so is the eager one from then on
    (TorchScript offers no step after compiling to put them back; fastnn.fuse fuses it again)."""
    name = "__prepare_scriptable__"

    def __call__(self):
        uninstall(self.module)
        log.info("torch.jit.script: %s runs unfused from now on (TorchScript compiles its class's own methods; "
                 "fastnn.fuse fuses it again)", type(self.module).__name__)
        return self.original() if self.original is not None else self.module


def install(module: nn.Module, method: str, fused, parts: dict, detail: str) -> FusedCall:
    call = FusedCall(module, method, fused, parts, detail)
    module.__dict__[method] = call
    for beside in (ReplicateForDataParallel, UnfuseForScripting):
        original = module.__dict__.get(beside.name)
        if not isinstance(original, beside):
            module.__dict__[beside.name] = beside(module, original)
    return call


def installed(module: nn.Module, method: str) -> bool:
    return isinstance(module.__dict__.get(method), FusedCall)


def uninstall(module: nn.Module) -> int:
    """Remove every FusedCall from `module` itself (restoring overrides that were there); returns
    how many there were."""
    removed = 0
    for name, value in list(module.__dict__.items()):
        if isinstance(value, (FusedCall, _BesideFusedCalls)):
            if value.original is not None:
                module.__dict__[name] = value.original
            else:
                del module.__dict__[name]
            removed += isinstance(value, FusedCall)
    return removed


def functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, jacrev, jacfwd, functional per-sample
    gradients) or forward-mode AD is running: fastnn's ops read raw pointers, so under those the
    composite of PyTorch ops runs instead, which every transform understands. (While torch.compile
    traces, the interpreter stack reads as non-empty whatever runs: the ops are traced then.)"""
    if torch.compiler.is_compiling():
        return False
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.forward_ad._current_level >= 0)


def batched(t) -> bool:
    """Whether `t` is a functorch or legacy-vmap wrapper (no storage of its own): what a backward
    vmapped over its grad outputs receives (jacobian(vectorize=True), is_grads_batched=True)."""
    f = torch._C._functorch
    return t is not None and (f.is_functorch_wrapped_tensor(t) or f.is_legacy_batchedtensor(t))
