"""Which backends the shared correctness tests run on here, and the awkward shapes they use."""
import torch

HAS_CUDA = torch.cuda.is_available()

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Each of the sizes 1, 3, 17, 65, 127, 1000 appears once as rows (M), in_features (K) and
# out_features (N): (M, K, N).
SIZES = [1, 3, 17, 65, 127, 1000]
SHAPES = [(1, 1, 1)] + [(SIZES[i], SIZES[(i + 1) % 6], SIZES[(i + 3) % 6]) for i in range(6)]


def native_backends():
    """(backend, device) pairs for the native backends: cpu always, cuda where a GPU is present, and
    the cuda backend on CPU tensors through the stand-in for fastnn._cuda (tests/cuda_standin.py)."""
    out = [("cpu", "cpu"), ("cuda", "cpu")]
    if HAS_CUDA:
        out.append(("cuda", "cuda"))
    return out


def backend_id(backend, device):
    return backend if device == backend or backend != "cuda" else "cuda-standin"
