"""Random combinations the structured tests do not enumerate: leading dims (zero sizes too),
strided and transposed inputs, which inputs require grad, bias or not, every activation, on
the CPU backend and on the Triton kernels (interpreter, or the GPU). Seeded: the same cases
every run."""
import random

import pytest
import torch

import fastnn
from cases import HAS_CUDA
from fastnn.backends import triton as triton_backend
from numerics import check_against_reference, torch_linear_act, torch_linear_glu

CASES = 60


def _case(seed, backend):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = "cuda" if backend == "triton" and HAS_CUDA else "cpu"
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if backend == "cpu" or device == "cuda" else [])
    dt = rng.choice(dtypes)
    lead = [rng.randint(0, 6) for _ in range(rng.randint(0, 2))]
    k, n = rng.randint(1, 40), rng.randint(1, 40)
    glu = rng.random() < 0.3
    act = rng.choice(list(fastnn.GATED) if glu else list(fastnn.ACTIVATIONS))
    x = torch.randn(*lead, k + 3, device=device)[..., 1:k + 1].to(dt)  # strided last dim
    if rng.random() < 0.3 and x.dim() >= 2:
        x = x.transpose(0, -2).contiguous().transpose(0, -2)
    x.requires_grad_(rng.random() < 0.8)

    def weight():
        w = (torch.randn(n, k, device=device) / k**0.5).to(dt)
        if rng.random() < 0.4:
            w = w.t().contiguous().t()
        return w.requires_grad_(rng.random() < 0.8)

    def bias():
        return torch.randn(n, device=device).to(dt).requires_grad_(rng.random() < 0.8) if rng.random() < 0.7 else None

    if glu:
        return act, [x, weight(), weight(), bias(), bias()], True
    return act, [x, weight(), bias()], False


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("seed", range(CASES))
def test_random_case(backend, seed):
    if backend == "triton" and triton_backend.IMPORT_ERROR is not None:
        pytest.skip("triton not usable")
    act, inputs, glu = _case(seed, backend)
    if glu:
        check_against_reference(lambda *a: fastnn.linear_glu(*a, act, backend=backend),
                                lambda *a: torch_linear_glu(*a, act), inputs, what=f"{backend} {act} seed {seed}")
    else:
        check_against_reference(lambda *a: fastnn.linear_act(*a, act, backend=backend),
                                lambda *a: torch_linear_act(*a, act), inputs, what=f"{backend} {act} seed {seed}")
