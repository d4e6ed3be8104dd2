"""Which backends the shared correctness tests run on here, and the awkward shapes they use."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Each of the sizes 1, 3, 17, 65, 127, 1000 appears once as rows (M), in_features (K) and
# out_features (N): (M, K, N).
SIZES = [1, 3, 17, 65, 127, 1000]
SHAPES = [(1, 1, 1)] + [(SIZES[i], SIZES[(i + 1) % 6], SIZES[(i + 3) % 6]) for i in range(6)]


# The cuda backend on CPU tensors, through the stand-in for fastnn._cuda (tests/cuda_standin.py,
# installed by conftest.py for cases with this mark).
STANDIN = pytest.mark.cuda_standin


def native_backend_params():
    """pytest params (backend, device) for the native backends: cpu always, the cuda backend on CPU
    tensors through the stand-in, and cuda on a GPU where one is present."""
    out = [pytest.param("cpu", "cpu", id="cpu"), pytest.param("cuda", "cpu", marks=STANDIN, id="cuda-standin")]
    if HAS_CUDA:
        out.append(pytest.param("cuda", "cuda", marks=pytest.mark.gpu, id="cuda"))
    return out
