"""Counting the fused ops that modules and fuse() run, so that a test tells a fused run from the
unfused fallback (both give the same numbers)."""
import collections
import importlib

import pytest

# (fastnn.fuse is the function; the module is reached by its name)
fuse_module = importlib.import_module("fastnn.fuse")
modules = importlib.import_module("fastnn.modules")


def counting_replacements(calls):
    """(module, name, replacement) for each fused op that modules and fuse() call: the replacement
    counts its calls into the Counter `calls` and runs the op."""
    replacements = []
    for module, name in ((modules, "linear_act"), (modules, "linear_glu"), (fuse_module, "linear_glu"),
                         (fuse_module, "linear_act")):
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        replacements.append((module, name, counted))
    original_mlp = modules.mlp

    def counted_mlp(x, *args, **kwargs):
        # the whole block fused: fc1 and its activation are among it
        calls["mlp"] += 1
        calls["linear_glu" if kwargs.get("up_weight") is not None else "linear_act"] += 1
        return original_mlp(x, *args, **kwargs)

    replacements.append((modules, "mlp", counted_mlp))
    replacements.append((fuse_module, "mlp", counted_mlp))
    return replacements


@pytest.fixture
def fused_calls(monkeypatch):
    calls = collections.Counter()
    for module, name, replacement in counting_replacements(calls):
        monkeypatch.setattr(module, name, replacement)
    return calls
