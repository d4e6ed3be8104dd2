"""The cuda backend's Python on CPU tensors, with fastnn._cuda replaced by a CPU stand-in that reads
and writes the raw addresses as the real module does (tests/cuda_standin.py): which native call
gets which pointers, leading dimensions and saved layouts, the bias gradients' scratch, the
fallbacks where cuBLASLt declines or an epilogue is not trusted, and the MLP block's paths, all
through fastnn's public functions with backend="cuda", against PyTorch's composite.

The shared matrices of test_linear_act.py and test_linear_glu.py, test_mlp.py and test_compile.py's
opchecks run through the stand-in too (their "cuda-standin" cases, marked cases.STANDIN). On a
machine without a GPU these are the only runs of fastnn/backends/cuda.py; the CUDA kernels and
cuBLASLt themselves are tested by tests/test_cuda.py on a GPU, and the stand-in against the built
module where no GPU is needed by tests/test_cuda_build.py."""
import pytest
import torch

import cuda_standin
import fastnn
from fastnn.backends import cuda as cb
from numerics import check_against_reference, make_inputs, torch_linear_act, torch_linear_glu
from test_mlp import _eager, _weights

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# rows: one bias-gradient row block (<= 16) or several (scratch); columns not a multiple of 8 or 128
# (the saved layouts' padded rows)
SHAPES = [(1, 9, 1), (16, 17, 40), (300, 33, 72), (37, 16, 130)]
ACTIVATION_EPILOGUES = (cb.RELU_BIAS, cb.RELU_AUX_BIAS, cb.GELU_BIAS, cb.GELU_AUX_BIAS, cb.RELU, cb.RELU_AUX,
                        cb.GELU, cb.GELU_AUX, cb.DRELU_BGRAD, cb.DGELU_BGRAD)


@pytest.fixture
def standin(monkeypatch):
    return cuda_standin.install(monkeypatch)


def _paths(op):
    return {path for (o, _, _), served in cb.paths().items() if o == op for path in served}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(fastnn.ACTIVATIONS))
def test_linear_act(standin, activation, dtype, shape, bias):
    m, k, n = shape
    x, w, b = make_inputs((m, k), n, dtype, "cpu", bias=bias)
    inputs = [x, w] + ([b] if bias else [])
    check_against_reference(lambda x, w, b=None: fastnn.linear_act(x, w, b, activation, backend="cuda"),
                            lambda x, w, b=None: torch_linear_act(x, w, b, activation), inputs,
                            what=f"cuda stand-in {activation} {dtype} {shape}")
    # the forward that keeps nothing (no gradient wanted)
    check_against_reference(lambda x, w, b=None: fastnn.linear_act(x, w, b, activation, backend="cuda"),
                            lambda x, w, b=None: torch_linear_act(x, w, b, activation), [t.detach() for t in inputs],
                            what=f"cuda stand-in {activation} {dtype} {shape} without grad")
    assert standin.calls, "the stand-in was not called"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(fastnn.GATED))
def test_linear_glu(standin, activation, dtype, shape):
    m, k, n = shape
    x, wg, wu, bg, bu = make_inputs((m, k), n, dtype, "cpu", glu=True)
    check_against_reference(lambda *t: fastnn.linear_glu(*t, activation, backend="cuda"),
                            lambda *t: torch_linear_glu(*t, activation), [x, wg, wu, bg, bu],
                            what=f"cuda stand-in {activation} {dtype} {shape}")
    assert "fastnn glu backward kernel + cuBLASLt GEMMs" in _paths("linear_glu_bwd")


@pytest.mark.parametrize("rows", [16, 300])
@pytest.mark.parametrize("recompute", list(fastnn.functional.RECOMPUTE_LEVELS))
@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_tanh", "leaky_relu", "silu", "swiglu", "reglu",
                                        "geglu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mlp(standin, dtype, activation, recompute, rows):
    gated = activation in fastnn.GATED
    x = torch.randn(rows, 24).to(dtype).requires_grad_()
    w1, b1, w2, b2, wu, bu = _weights(24, 65, 20, dtype, gated)
    check_against_reference(
        lambda x, w1, b1, w2, b2, wu=None, bu=None: fastnn.mlp(x, w1, b1, w2, b2, activation, up_weight=wu, up_bias=bu,
                                                               recompute=recompute, backend="cuda"),
        lambda x, w1, b1, w2, b2, wu=None, bu=None: _eager(x, w1, b1, w2, b2, wu, bu, activation),
        [x, w1, b1, w2, b2] + ([wu, bu] if gated else []), what=f"cuda stand-in mlp {activation} {recompute}")
    if activation in ("relu", "gelu_tanh") and recompute == "none":
        # fc1's act' in fc2's dgrad GEMM, and fc1's backward as plain GEMMs with a column sum
        assert _paths("mlp_hidden_grad") == {f"cuBLASLt D{'RELU' if activation == 'relu' else 'GELU'}_BGRAD"}


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "identity"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_epilogues_declined(standin, activation, dtype):
    """cuBLASLt has no algorithm for the activation epilogues, then not even for the plain GEMM:
    fastnn's epilogue kernel, then torch's GEMM, give the same results."""
    x, w, b = make_inputs((37, 16), 130, dtype, "cpu")
    standin.decline = set(ACTIVATION_EPILOGUES)
    check_against_reference(lambda *t: fastnn.linear_act(*t, activation, backend="cuda"),
                            lambda *t: torch_linear_act(*t, activation), [x, w, b], what="declined epilogues")
    if activation != "identity":
        assert _paths("linear_act_fwd") == {"cuBLASLt GEMM + fastnn epilogue kernel"}
    standin.decline = set(range(len(cb.EPILOGUE_NAMES)))
    standin.calls.clear()
    check_against_reference(lambda *t: fastnn.linear_act(*t, activation, backend="cuda"),
                            lambda *t: torch_linear_act(*t, activation), [x, w, b], what="declined GEMMs")
    assert not any(c.startswith("lt_gemm") for c in standin.calls)


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_wrong_epilogues_are_not_trusted(standin, activation):
    """An activation epilogue that disagrees with fastnn's definition on the probe's exact inputs is
    not used (epilogue_trust says so), and the results are right all the same."""
    standin.wrong = set(ACTIVATION_EPILOGUES)
    x, w, b = make_inputs((37, 16), 130, torch.bfloat16, "cpu")
    check_against_reference(lambda *t: fastnn.linear_act(*t, activation, backend="cuda"),
                            lambda *t: torch_linear_act(*t, activation), [x, w, b], what="untrusted epilogues")
    trust = cb.epilogue_trust()
    assert trust and not any(trust.values()), trust
    assert _paths("linear_act_fwd") == {"cuBLASLt GEMM + fastnn epilogue kernel"}


def test_right_epilogues_are_trusted_and_used(standin):
    x, w, b = make_inputs((37, 16), 130, torch.bfloat16, "cpu")
    check_against_reference(lambda *t: fastnn.linear_act(*t, "relu", backend="cuda"),
                            lambda *t: torch_linear_act(*t, "relu"), [x, w, b], what="trusted epilogues")
    assert cb.epilogue_trust() == {(0, "bfloat16", "RELU_AUX_BIAS"): True}
    assert _paths("linear_act_fwd") == {"cuBLASLt RELU_AUX_BIAS"}


@pytest.mark.parametrize("rows,count,fits", [(16, 1, True), (300, 1, True), (300, 2, True), (300, 2, False)])
def test_bias_grad_scratch(standin, monkeypatch, rows, count, fits):
    """The partial sums' buffers: none for one row block, else consecutive, inside the workspace
    where it holds them all, else inside their own allocation."""
    cols = 72
    elems = standin.bias_grad_scratch_elems(rows, cols)
    if not fits:
        cb._WORKSPACE_BYTES[0] = elems * 4 * count - 4
    call = cb._Call(torch.empty(1, dtype=torch.bfloat16))
    addresses, held = call.bias_grad_scratch(rows, cols, count)
    if elems == 0:
        assert addresses == (0,) * count and held is None
        return
    owner = call.ws if fits else held
    assert (held is None) == fits
    start, end = owner.data_ptr(), owner.data_ptr() + owner.numel() * owner.element_size()
    for i, a in enumerate(addresses):
        assert a == addresses[0] + i * elems * 4
        assert start <= a and a + elems * 4 <= end


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "gelu", "swiglu"])
def test_compile_fullgraph(standin, activation):
    """torch.compile(fullgraph=True) of the cuda backend's ops (their fake kernels' saved layouts, the
    autograd rules around the torch.library ops), forward and gradients against PyTorch's composite."""
    torch._dynamo.reset()
    if activation in fastnn.GATED:
        inputs = list(make_inputs((2, 9, 16), 13, torch.float32, "cpu", glu=True))
        f = torch.compile(lambda *t: fastnn.linear_glu(*t, activation, backend="cuda") * 2, fullgraph=True)
        ref = lambda *t: torch_linear_glu(*t, activation) * 2  # noqa: E731
    else:
        inputs = list(make_inputs((2, 9, 16), 13, torch.float32, "cpu"))
        f = torch.compile(lambda *t: fastnn.linear_act(*t, activation, backend="cuda") * 2, fullgraph=True)
        ref = lambda *t: torch_linear_act(*t, activation) * 2  # noqa: E731
    check_against_reference(f, ref, inputs, what=f"compiled cuda stand-in {activation}")
    assert standin.calls, "the compiled graph did not run the cuda backend"


# Suites whose every fastnn call then runs the cuda backend's Python (test_errors.py and the cpu
# backend's own tests ask for the cpu backend or for a refusal the routing takes away)
SUITES = ["test_modules.py", "test_fuse.py", "test_fuse_vision.py", "test_nonfinite_grads.py", "test_saved_memory.py",
          "test_bias_changed_in_place.py", "test_double_backward.py", "test_func.py", "test_fuzz.py",
          "test_tracing.py", "test_export.py", "test_tensor_subclasses.py", "test_transformers_model_tests.py"]


def test_suites_with_auto_on_the_standin():
    """The drop-in suites (modules, fuse, hooks and wrappers, torch.func, export, saved memory,
    non-finite gradients, Hugging Face transformers' own model tests) with backend "auto" sending
    their CPU calls to the cuda backend's Python on the stand-in (conftest.AUTO_ON_CUDA_STANDIN), in
    a pytest of their own: they pass as they do on the cpu backend."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, FASTNN_TEST_AUTO_ON_CUDA_STANDIN="1")
    # (from tests/: `python -m pytest` puts its working folder first on sys.path, and the repository
    # root's fastnn is the unbuilt source tree)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          *(str(here / name) for name in SUITES)],
                         cwd=here, env=env, capture_output=True, text=True, timeout=1200)
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and " failed" not in run.stdout, tail
