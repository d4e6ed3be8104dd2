"""Tools that record or intercept the ATen ops a call runs, which fastnn's kernels (writing through
raw pointers) would slip past:
- torch.jit.trace (how models are often frozen for deployment, and what the TorchScript ONNX
  exporter runs): fastnn records PyTorch's composite there, so a trace of a fastnn model is a trace
  of the unfused model: plain ATen ops that replay correctly on new inputs, save, load and give
  gradients;
- a TorchDispatchMode (make_fx's tracer, selective checkpointing, FlopCounterMode): fastnn's calls
  go through its torch.library ops there, which the mode sees as ops (with their flop counts)."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn

import fastnn


def _trace(model, x, grad=False, strict=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.set_grad_enabled(grad):
            return torch.jit.trace(model, x, check_trace=False, strict=strict)


def _close(got, want):
    """The trace replays PyTorch's composite, fastnn's eager call its kernels: the same within the
    numerics rule, not bit for bit (a trace of the kernels replayed empty buffers: 1e31s and NaNs)."""
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.02 * want.abs().max().item())


def _reloaded(traced):
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def _ops(traced):
    return {node.kind() for node in traced.inlined_graph.nodes()}


MODULES = {
    "FusedLinear": lambda: fastnn.FusedLinear(8, 12, activation="gelu"),
    "FusedMLP": lambda: fastnn.FusedMLP(8, 12, activation="gelu", dropout=0.1),
    "FusedMLP swiglu": lambda: fastnn.FusedMLP(8, 12, activation="swiglu"),
    "FusedMLP recompute": lambda: fastnn.FusedMLP(8, 12, activation="relu", recompute=True),
    "fused Sequential": lambda: fastnn.fuse(nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8), nn.ReLU())),
    "TransformerEncoderLayer": lambda: fastnn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(MODULES))
def test_traced_module_replays_on_new_inputs(name, dtype):
    torch.manual_seed(0)
    model = MODULES[name]().to(dtype).eval()
    x, new = torch.randn(2, 5, 8, dtype=dtype), torch.randn(2, 5, 8, dtype=dtype)
    traced = _trace(model, x)
    assert not any(kind.startswith(("prim::PythonOp", "fastnn::")) for kind in _ops(traced)), _ops(traced)
    with torch.no_grad():
        want = model(new)
    for replay in (traced, _reloaded(traced)):
        _close(replay(new), want)


def test_traced_training_step_gives_the_gradients():
    torch.manual_seed(0)
    model = fastnn.FusedMLP(8, 12, activation="gelu").train()
    x = torch.randn(6, 8, requires_grad=True)
    traced = _trace(model, x, grad=True)
    new = torch.randn(6, 8, requires_grad=True)
    got = torch.autograd.grad(traced(new).square().sum(), [new, *model.parameters()])
    want = torch.autograd.grad(model(new).square().sum(), [new, *model.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_functional_ops_under_trace():
    torch.manual_seed(0)
    w, b, wu = torch.randn(12, 8), torch.randn(12), torch.randn(12, 8)
    w2 = torch.randn(8, 12)

    def f(x):
        return (fastnn.linear_act(x, w, b, "silu") + fastnn.linear_glu(x, w, wu, b, None, "geglu")
                + fastnn.mlp(x, w, b, w2, None, "tanh") @ w2)

    traced = _trace(f, torch.randn(3, 8))
    new = torch.randn(7, 8)
    _close(traced(new), f(new))
    with pytest.raises(fastnn.BackendUnavailableError, match="torch.jit.trace"):
        _trace(lambda x: fastnn.linear_act(x, w, b, "gelu", backend="cpu"), torch.randn(3, 8))


def test_traced_fused_transformers_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    reference = transformers.BertForSequenceClassification(config).eval()
    model = fastnn.fuse(copy.deepcopy(reference))
    assert any(r.fused for r in model.fastnn_fuse_report)
    ids, new = torch.randint(0, 100, (2, 9)), torch.randint(0, 100, (2, 9))
    traced = _trace(model, ids, strict=False)
    with torch.no_grad():
        want = reference(new)["logits"]
    _close(traced(new)["logits"], want)


def test_make_fx_real_tensors_records_the_ops():
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    w, b, wu, w2 = torch.randn(12, 8), torch.randn(12), torch.randn(12, 8), torch.randn(8, 12)

    def f(x):
        return (fastnn.linear_act(x, w, b, "gelu").sum(1) + fastnn.linear_glu(x, w, wu, b, None, "swiglu").sum(1)
                + fastnn.mlp(x, w, b, w2, None, "relu").sum(1))

    graph = make_fx(f, tracing_mode="real")(torch.randn(5, 8))
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert {"fastnn.linear_act_fwd.default", "fastnn.linear_glu_fwd.default"} <= targets, targets
    new = torch.randn(5, 8)
    torch.testing.assert_close(graph(new), f(new), rtol=0, atol=0)


def test_flop_counter_counts_the_fused_ops():
    from torch.utils.flop_counter import FlopCounterMode

    m, k, n = 6, 8, 12
    x = torch.randn(m, k, requires_grad=True)
    mlp = fastnn.FusedMLP(k, n, activation="gelu")
    glu = fastnn.FusedMLP(k, n, activation="swiglu")
    gemm = 2 * m * k * n
    for model, gemms in ((mlp, 6), (glu, 9)):  # fc1 (two for a gated unit) and fc2, each x3 with backward
        with FlopCounterMode(display=False) as counter:
            model(x).sum().backward()
        assert counter.get_total_flops() == gemms * gemm, (model, counter.get_flop_counts())
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            fastnn.linear_act(x, mlp.fc1.weight, None, "gelu")
    assert counter.get_total_flops() == gemm
