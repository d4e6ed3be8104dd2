"""Exporting models that use fastnn, as users deploy them:
- torch.export: the exported program records fastnn's ops (with their fake kernels) and replays
  them, saved and loaded too; a model whose own forward fastnn.fuse replaced exports as well
  (torch.export reads the root's `forward.__code__`);
- torch.onnx.export (the torch.export-based exporter, torch's default): ONNX has no operator for
  fastnn's kernels, so fastnn records PyTorch's composite there and the ONNX model holds standard
  operators only, which onnxruntime runs to the unfused model's outputs; a backend named
  explicitly is a clear error instead.
(torch.jit.trace and the TorchScript ONNX exporter: tests/test_tracing.py.)"""
import copy
import io

import pytest
import torch
from torch import nn

import fastnn
from fastnn.activations import ACTIVATIONS


def _sequential():
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.SiLU())


class _Outer(nn.Module):
    """A fused block inside a model whose own forward stays the class's."""

    def __init__(self):
        super().__init__()
        self.mlp = fastnn.fuse(_sequential())

    def forward(self, x):
        return self.mlp(x) * 2


class _EveryActivation(nn.Module):
    """A FusedLinear per activation, one after another, and the gated and plain FusedMLPs."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(fastnn.FusedLinear(16, 16, activation=name) for name in ACTIVATIONS)
        self.mlps = nn.ModuleList(fastnn.FusedMLP(16, 24, activation=name, dropout=0.1)
                                  for name in ("gelu", "swiglu", "geglu", "reglu"))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x) / 2
        for mlp in self.mlps:
            x = mlp(x)
        return x


def _encoder_layer():
    return fastnn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)


def _build(name):
    torch.manual_seed(0)
    if name == "fused sequential":
        model = _sequential()
        return fastnn.fuse(copy.deepcopy(model)), model
    if name == "fused block inside":
        model = _Outer()
        return model, fastnn.unfuse(copy.deepcopy(model))
    model = {"every activation": _EveryActivation, "encoder layer": _encoder_layer}[name]()
    return model, None


MODELS = ["fused sequential", "fused block inside", "every activation", "encoder layer"]
X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_replays_fastnn_ops(name):
    model, reference = _build(name)
    model.eval()
    with torch.no_grad():
        want = model(X)
        if reference is not None:
            torch.testing.assert_close(want, reference.eval()(X), rtol=1e-5, atol=1e-5)
    program = torch.export.export(model, (X,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any(t.startswith("fastnn.") for t in targets), targets
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    x = torch.randn(2, 5, 16)  # not the example input
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.module()(x), want, rtol=1e-5, atol=1e-5)


onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # (what torch.onnx.export's default exporter needs)
ort = pytest.importorskip("onnxruntime")

_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "pkg.onnxscript.torch_lib.common")


def _onnx_outputs(model, path, args=(), kwargs=None):
    """The model exported to ONNX at `path`, checked to hold standard operators only, run by
    onnxruntime on the export's own inputs."""
    torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, verbose=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    odd = {f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in _STANDARD_DOMAINS}
    assert not odd, odd
    assert not any("fastnn" in n.op_type or "fastnn" in n.domain for n in nodes)
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    # positional inputs first, in order; keyword inputs keep their names
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    feeds.update({n: kwargs[n].numpy() for n in names[len(args):]})
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export(name, tmp_path):
    model, reference = _build(name)
    model.eval()
    with torch.no_grad():
        want = model(X) if reference is None else reference.eval()(X)
    got, = _onnx_outputs(model, tmp_path / "model.onnx", (X,))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_onnx_export_of_a_named_backend_is_a_clear_error(tmp_path):
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8)

        def forward(self, x):
            return fastnn.linear_act(x, self.fc.weight, self.fc.bias, "gelu", backend="cpu")

    with pytest.raises(Exception) as info:
        torch.onnx.export(Named(), (X,), str(tmp_path / "m.onnx"), dynamo=True, verbose=False)
    chain, err = [], info.value
    while err is not None:
        chain.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    assert any("BackendUnavailableError" in e and "cannot be exported to ONNX" in e for e in chain), chain


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "opt"])
def test_onnx_export_of_fused_hugging_face_models(name, tmp_path):
    from test_fuse import _fused_and_reference, _inputs

    model, reference, fused = _fused_and_reference(name)
    assert fused
    for m in (model, reference):
        m.eval()
        m.config.use_cache = False
    inputs = _inputs(name)
    with torch.no_grad():
        want = reference(**inputs).logits
    got = _onnx_outputs(model, tmp_path / "model.onnx", kwargs=inputs)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
