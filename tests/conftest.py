import os

import pytest
import torch

# Tier 2 runs the real Triton kernels on CPU tensors through Triton's interpreter, which must be
# switched on before any Triton kernel is imported. On a GPU machine the kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

import fastnn  # noqa: E402

if fastnn._native._C is None:
    raise pytest.UsageError(
        f"fastnn was imported from {os.path.dirname(fastnn.__file__)} without its native module "
        f"({fastnn._native.C_IMPORT_ERROR}). Install it (pip install . or pip install -e .) and run "
        "`pytest tests`: `python -m pytest` from the repository root imports the unbuilt source tree.")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (tier 4)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
