"""Counting the fused ops that modules and fuse() run, so that a test tells a fused run from the
unfused fallback (both give the same numbers)."""
import collections
import importlib

import pytest

# (fastnn.fuse is the function; the module is reached by its name)
fuse_module = importlib.import_module("fastnn.fuse")
modules = importlib.import_module("fastnn.modules")


@pytest.fixture
def fused_calls(monkeypatch):
    calls = collections.Counter()
    for module, name in ((modules, "linear_act"), (modules, "linear_glu"), (fuse_module, "linear_glu")):
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls
