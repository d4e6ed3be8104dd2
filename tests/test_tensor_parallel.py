"""Tensor parallelism with DTensor, 2 processes on CPU with gloo: fastnn's ops on column-sharded
weights (fastnn/distributed.py's sharding rules) run fastnn's kernels on each rank's hidden slice
and give one process's outputs and gradients. parallelize_module with the usual
ColwiseParallel / RowwiseParallel plan on a FusedMLP, and on a fused Hugging Face LLaMA MLP (gate
and up column-wise, down row-wise), gives them too, with fastnn's fused kernels running on each
rank's half of the hidden features (counted). All cases run in one 2-process run."""
import contextlib
import importlib.util
import os

import pytest
import torch

import fastnn
import gloo

CASES = ["gelu", "relu", "identity", "swiglu", "mlp-gelu", "mlp-swiglu-fc1", "module-gelu", "module-swiglu",
         "module-gelu-fc1", "llama-fuse-then-shard", "llama-shard-then-fuse", "fusedlinear-gelu",
         "module-gelu-compiled", "module-gelu-globalhook"]
TRITON_CASES = ["gelu@triton", "swiglu@triton", "mlp-relu@triton"]


def _inputs(case):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=gen)
    w1, wu = torch.randn(16, 8, generator=gen) / 3, torch.randn(16, 8, generator=gen) / 3
    b1, bu = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    w2, b2 = torch.randn(8, 16, generator=gen) / 4, torch.randn(8, generator=gen)
    return [t.requires_grad_() for t in (x, w1, b1, wu, bu, w2, b2)]


def _module(case):
    torch.manual_seed(0)
    if case.startswith("fusedlinear"):  # fastnn's nn.Linear subclass: its own forward is the fused op
        return torch.nn.Sequential(fastnn.FusedLinear(8, 16, activation="gelu", backend="cpu"), torch.nn.Linear(16, 8))
    if case.startswith("llama"):
        import transformers

        cfg = transformers.LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, hidden_act="silu")
        return transformers.models.llama.modeling_llama.LlamaMLP(cfg)
    return fastnn.FusedMLP(8, 16, activation=case.split("-")[1], backend="cpu",
                           recompute="fc1" if case.endswith("fc1") else False)


def _module_input(case):
    """3-D, (batch, tokens, features): the hooks and the op see the leading dims too."""
    return _inputs(case)[0].detach().reshape(2, 3, 8).requires_grad_()


def _single(case):
    """Outputs and gradients of one process on the whole tensors."""
    if case.startswith(("module", "llama", "fusedlinear")):
        model = _module(case)
        x = _module_input(case)
        model(x).square().sum().backward()
        return [model(x).detach(), x.grad] + [p.grad for _, p in sorted(model.named_parameters())]
    x, w1, b1, wu, bu, w2, b2 = inputs = _inputs(case)
    y = _forward(case, x, w1, b1, wu, bu, w2, b2)
    y.square().sum().backward()
    return [y.detach()] + [t.grad for t in inputs]


def _forward(case, x, w1, b1, wu, bu, w2, b2):
    case, _, backend = case.partition("@")  # "@triton": the Triton kernels (the interpreter here)
    backend = backend or "cpu"
    if case in ("gelu", "relu", "identity"):
        return fastnn.linear_act(x, w1, b1, case, backend=backend)
    if case == "swiglu":
        return fastnn.linear_glu(x, w1, wu, b1, bu, "swiglu", backend=backend)
    act = case.split("-")[1]
    gated = act in fastnn.GATED
    return fastnn.mlp(x, w1, b1, w2, b2, act, up_weight=wu if gated else None, up_bias=bu if gated else None,
                      recompute="fc1" if case.endswith("fc1") else "none", backend=backend)


def _worker_all(rank, cases, out_dir):
    """Every case in one 2-process run (starting the processes is most of a case's time); a case
    that raises leaves its traceback in failed-<case>.txt and ends the run."""
    import traceback

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (gloo.WORLD,))
    for case in cases:
        try:
            _worker(rank, mesh, case, out_dir)
        except BaseException:
            with open(os.path.join(out_dir, f"failed-{case}.txt"), "w") as f:
                f.write(f"rank {rank}:\n{traceback.format_exc()}")
            raise


def _worker(rank, mesh, case, out_dir):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    if case.startswith(("module", "llama", "fusedlinear")):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        model = _module(case)
        if case.startswith("fusedlinear"):
            plan = {"0": ColwiseParallel(), "1": RowwiseParallel()}
        elif case.startswith("llama"):
            plan = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}
        elif case.startswith("module-swiglu"):
            plan = {"fc1.gate_proj": ColwiseParallel(), "fc1.up_proj": ColwiseParallel(), "fc2": RowwiseParallel()}
        else:
            plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
        if case == "llama-fuse-then-shard":
            assert [r.fused for r in fastnn.fuse(model).fastnn_fuse_report] == [True]
        parallelize_module(model, mesh, plan)
        if case == "llama-shard-then-fuse":
            assert [r.fused for r in fastnn.fuse(model).fastnn_fuse_report] == [True]
        if case.endswith("compiled"):  # Dynamo traces the parallel style's hooks: the module runs unfused
            model = torch.compile(model, backend="eager")
        seen = []
        x = _module_input(case)
        with _count_fused_calls() as calls:
            if case.endswith("globalhook"):  # a hook for every module must see fc1's call: unfused
                handle = torch.nn.modules.module.register_module_forward_hook(
                    lambda m, i, o: seen.append(type(m).__name__))
            y = model(x)
            y.square().sum().backward()
            if case.endswith("globalhook"):
                handle.remove()
        if case.endswith("globalhook"):
            assert seen == ["Linear", "Dropout", "Linear", "FusedMLP"], seen
        # fastnn's fused forward and backward ran, each on this rank's 8 of the 16 hidden features
        # (the "fc1" level runs the forward a second time in backward)
        if case.endswith(("compiled", "globalhook")):
            assert calls == {"fwd": [], "bwd": []}, calls
        else:
            assert calls == {"fwd": [(6, 8)] * (2 if case.endswith("fc1") else 1), "bwd": [(6, 8)]}, calls
        got = [model(x).detach(), x.grad] + [p.grad.full_tensor() for _, p in sorted(model.named_parameters())]
    else:
        x, w1, b1, wu, bu, w2, b2 = _inputs(case)
        col, row_sharded = [Shard(0)], [Shard(1)]
        d = {"w1": distribute_tensor(w1.detach(), mesh, col), "b1": distribute_tensor(b1.detach(), mesh, col),
             "wu": distribute_tensor(wu.detach(), mesh, col), "bu": distribute_tensor(bu.detach(), mesh, col),
             "w2": distribute_tensor(w2.detach(), mesh, row_sharded),
             "b2": distribute_tensor(b2.detach(), mesh, [Replicate()])}
        for t in d.values():
            t.requires_grad_()
        xl = x.detach().requires_grad_()
        xd = DTensor.from_local(xl, mesh, [Replicate()])
        y = _forward(case, xd, d["w1"], d["b1"], d["wu"], d["bu"], d["w2"], d["b2"])
        if case.startswith("mlp"):
            assert y.placements[0].is_replicate() or y.placements[0].is_partial()
        else:
            assert y.placements == (Shard(1),), y.placements  # each rank computed its hidden slice
        y = y.full_tensor()
        y.square().sum().backward()
        got = [y.detach(), xl.grad] + [d[k].grad.full_tensor() if d[k].grad is not None else None
                                       for k in ("w1", "b1", "wu", "bu", "w2", "b2")]
    if rank == 0:  # "* 1": plain tensors (an AsyncCollectiveTensor waits and unwraps)
        torch.save([None if t is None else t.detach() * 1 for t in got], os.path.join(out_dir, f"got-{case}.pt"))


@contextlib.contextmanager
def _count_fused_calls():
    """Inside, records the (rows, hidden) shape of every fused activation the cpu backend
    computes, forward and backward (fc1's; not fc2's, whose activation is the identity)."""
    from fastnn.backends import BACKENDS

    be, calls = BACKENDS["cpu"], {"fwd": [], "bwd": []}
    # method name -> (forward or backward, where the activation is among its arguments)
    methods = {"linear_act_fwd": ("fwd", 3), "linear_glu_fwd": ("fwd", 5), "linear_act_bwd": ("bwd", 5),
               "linear_glu_bwd": ("bwd", 8)}

    def recorded(method, kind, act_at):
        def run(*args, **kwargs):
            out = method(*args, **kwargs)
            if args[act_at].name != "identity":
                calls[kind].append(tuple((out[0] if kind == "fwd" else args[0]).shape))
            return out
        return run

    for name, (kind, act_at) in methods.items():
        setattr(be, name, recorded(getattr(be, name), kind, act_at))
    try:
        yield calls
    finally:
        for name in methods:
            delattr(be, name)  # the class's methods again


def _skip_reason(case):
    if case.startswith("llama") and importlib.util.find_spec("transformers") is None:
        return "needs transformers"
    if case.endswith("@triton"):
        from fastnn.backends import triton as triton_backend
        if triton_backend.IMPORT_ERROR is not None or torch.cuda.is_available():
            return "the Triton cases run the interpreter on CPU tensors (gloo)"
    return None


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    """One 2-process run of every case that runs here: (its folder, the run's error or None)."""
    out_dir = tmp_path_factory.mktemp("tensor_parallel")
    try:
        gloo.spawn(_worker_all, ([c for c in CASES + TRITON_CASES if _skip_reason(c) is None], str(out_dir)),
                   out_dir)
    except Exception as e:  # each case's test says what it means for that case
        return out_dir, e
    return out_dir, None


@pytest.mark.skipif(not gloo.available(), reason="needs torch.distributed with gloo (Linux/macOS)")
@pytest.mark.parametrize("case", CASES + TRITON_CASES)
def test_tensor_parallel_matches_one_process(case, parallel_run):
    reason = _skip_reason(case)
    if reason:
        pytest.skip(reason)
    out_dir, error = parallel_run
    if (out_dir / f"failed-{case}.txt").exists():
        pytest.fail((out_dir / f"failed-{case}.txt").read_text())
    assert (out_dir / f"got-{case}.pt").exists(), f"the 2-process run ended before this case: {error!r}"
    got = torch.load(out_dir / f"got-{case}.pt")
    ref = _single(case)
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        if b is None:
            assert a is None, i
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{case} output/grad {i}")
