"""Tier 4 for the CUDA backend (cuBLASLt epilogues and fastnn's CUDA kernels), beyond the shared
matrix of test_linear_act.py / test_linear_glu.py: transformer-sized and decode-sized shapes,
sizes that are not multiples of 8 (cuBLASLt's alignment rules), every epilogue path, the tensor's
own device, and the error paths. Skipped without a GPU."""
import pytest
import torch

import fastnn
from numerics import check_against_reference, make_inputs, torch_linear_act, torch_linear_glu

pytestmark = pytest.mark.gpu

SHAPES = [(4096, 768, 3072), (8, 4096, 11008), (1000, 1000, 127), (33, 17, 250), (1, 9, 1)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(fastnn.ACTIVATIONS))
def test_linear_act_large_and_odd(shape, dtype, activation):
    m, k, n = shape
    x, w, b = make_inputs((m, k), n, dtype, "cuda")
    check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cuda"),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b],
                            what=f"cuda {activation} {dtype} {shape}")


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "identity", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_epilogue_paths(activation, bias, grad):
    """cuBLASLt's fused epilogues with and without bias and aux (inference vs training)."""
    x, w, b = make_inputs((130, 64), 96, torch.bfloat16, "cuda", bias=bias, requires_grad=grad)
    inputs = [x, w] + ([b] if bias else [])
    fn = (lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cuda")) if bias else \
        (lambda x, w: fastnn.linear_act(x, w, None, activation, backend="cuda"))
    ref = (lambda x, w, b: torch_linear_act(x, w, b, activation)) if bias else \
        (lambda x, w: torch_linear_act(x, w, None, activation))
    check_against_reference(fn, ref, inputs, what=f"{activation} bias={bias} grad={grad}")


@pytest.mark.parametrize("activation", list(fastnn.GATED))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_glu_llama_shape(activation, dtype):
    inputs = make_inputs((512, 1024), 2816, dtype, "cuda", glu=True)
    check_against_reference(
        lambda x, wg, wu, bg, bu: fastnn.linear_glu(x, wg, wu, bg, bu, activation, backend="cuda"),
        lambda x, wg, wu, bg, bu: torch_linear_glu(x, wg, wu, bg, bu, activation), list(inputs), what=activation)


def test_other_device_and_stream():
    """The tensor's own device and torch's current stream are used."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x, w, b = make_inputs((64, 32), 48, torch.bfloat16, dev)
    s = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(s):
        y = fastnn.linear_act(x, w, b, "silu", backend="cuda")
        y.float().sum().backward()
    torch.cuda.synchronize(dev)
    assert y.device == dev and x.grad.device == dev
    ref = torch_linear_act(x.detach().float(), w.detach().float(), b.detach().float(), "silu")
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)


def test_cuda_backend_refuses_float64_and_cpu():
    x, w, b = make_inputs((4, 8), 8, torch.float64, "cuda", requires_grad=False)
    with pytest.raises(fastnn.BackendUnavailableError, match="cuda.*float64"):
        fastnn.linear_act(x, w, b, backend="cuda")
    with pytest.raises(fastnn.BackendUnavailableError, match="CUDA tensors"):
        fastnn.linear_act(x.cpu(), w.cpu(), b.cpu(), backend="cuda")


def test_auto_on_gpu_is_a_native_backend():
    x, w, b = make_inputs((16, 32), 32, torch.bfloat16, "cuda")
    name = fastnn.backends.resolve("auto", "linear_act", x, [w], fastnn.activations.get("gelu"))
    assert name in ("cuda", "triton")


def test_compile_fullgraph_cuda_backend():
    torch._dynamo.reset()
    x, w, b = make_inputs((64, 128), 256, torch.bfloat16, "cuda")
    f = torch.compile(lambda x, w, b: fastnn.linear_act(x, w, b, "relu", backend="cuda") + 1, fullgraph=True)
    check_against_reference(f, lambda x, w, b: torch_linear_act(x, w, b, "relu") + 1, [x, w, b], what="compile")
