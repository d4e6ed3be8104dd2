import os
import sys

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
    config.addinivalue_line("markers", "cuda_standin: the cuda backend on CPU tensors, through tests/cuda_standin.py")


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


# FASTNN_TEST_AUTO_ON_CUDA_STANDIN=1: backend "auto" sends every CPU call of the cuda backend's dtypes
# to the cuda backend's Python on the stand-in, so that whole suites (modules, fuse, transformers'
# own model tests) run it (test_cuda_standin.py::test_suites_with_auto_on_the_standin)
AUTO_ON_CUDA_STANDIN = os.environ.get("FASTNN_TEST_AUTO_ON_CUDA_STANDIN") == "1"


@pytest.fixture(autouse=True)
def _cuda_standin(request, monkeypatch):
    """Cases marked cuda_standin (cases.STANDIN) run the cuda backend on CPU tensors, with the CPU
    stand-in for fastnn._cuda (tests/cuda_standin.py); with AUTO_ON_CUDA_STANDIN every case does,
    wherever backend "auto" serves a CPU call."""
    if AUTO_ON_CUDA_STANDIN or request.node.get_closest_marker("cuda_standin") is not None:
        import cuda_standin

        cuda_standin.install(monkeypatch)
        if AUTO_ON_CUDA_STANDIN:
            cuda_standin.route_auto(monkeypatch)


def pytest_sessionfinish(session):
    """On a GPU, FASTNN_PATHS_LOG names a file that gets which path served each cuda-backend call
    of this run (each xdist worker appends its own lines): the GPU tier's summary of what cuBLASLt's
    epilogues served and what fastnn's kernels did, and what the epilogue probes decided."""
    log = os.environ.get("FASTNN_PATHS_LOG")
    cuda_backend = sys.modules.get("fastnn.backends.cuda")
    if not log or cuda_backend is None or not cuda_backend.paths():
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(log, "a") as f:
        for key, served in sorted(cuda_backend.paths().items()):
            f.write(f"[{worker}] {' '.join(key)}: " + "; ".join(f"{p} x{n}" for p, n in served.items()) + "\n")
        for key, ok in sorted(cuda_backend.epilogue_trust().items()):
            f.write(f"[{worker}] probe {' '.join(map(str, key))}: {'trusted' if ok else 'not used'}\n")
