"""Exporting models that use fastnn, as users deploy them:
- torch.export: the exported program records fastnn's ops (with their fake kernels) and replays
  them, saved and loaded too; a model whose own forward fastnn.fuse replaced exports as well
  (torch.export reads the root's `forward.__code__`).
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

