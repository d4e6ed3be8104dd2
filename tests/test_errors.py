"""Bad inputs raise a clear Python exception that names what was wrong."""
import os
import subprocess
import sys

import pytest
import torch

import fastnn


def _inputs(m=4, k=5, n=3, dtype=torch.float32):
    return torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_mismatched_in_features(backend):
    x, w, b = _inputs()
    with pytest.raises(ValueError, match=r"x has 6 in_features .* expects 5"):
        fastnn.linear_act(torch.randn(4, 6), w, b, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_wrong_bias_shape(backend):
    x, w, _ = _inputs()
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        fastnn.linear_act(x, w, torch.randn(4), backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        fastnn.linear_act(x, w, torch.randn(1, 3), backend=backend)


def test_weight_must_be_2d():
    x, _, b = _inputs()
    with pytest.raises(ValueError, match=r"weight must be 2-D"):
        fastnn.linear_act(x, torch.randn(3, 5, 1), b)


def test_scalar_x():
    _, w, b = _inputs()
    with pytest.raises(ValueError, match=r"at least 1 dim"):
        fastnn.linear_act(torch.tensor(1.0), w, b)


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_dtype_mismatch(backend):
    x, w, b = _inputs()
    with pytest.raises(TypeError, match=r"x is torch.float32 but weight is torch.bfloat16"):
        fastnn.linear_act(x, w.bfloat16(), b, backend=backend)
    with pytest.raises(TypeError, match=r"x is torch.float32 but bias is torch.float64"):
        fastnn.linear_act(x, w, b.double(), backend=backend)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_tensors(dtype):
    x, w, b = _inputs()
    with pytest.raises(TypeError, match=rf"x has dtype {dtype}"):
        fastnn.linear_act(x.to(dtype), w, b)
    with pytest.raises(TypeError, match=rf"weight has dtype {dtype}"):
        fastnn.linear_act(x, w.to(dtype), b)


def test_not_a_tensor():
    _, w, b = _inputs()
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        fastnn.linear_act([[1.0] * 5], w, b)


def test_unknown_activation_lists_valid_names():
    x, w, b = _inputs()
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*valid activations: identity, relu, gelu"):
        fastnn.linear_act(x, w, b, "swish")
    with pytest.raises(ValueError, match=r"'swiglu' is gated: use linear_glu"):
        fastnn.linear_act(x, w, b, "swiglu")
    with pytest.raises(ValueError, match=r"unknown gated activation 'gelu'.*use linear_act.*swiglu, geglu"):
        fastnn.linear_glu(x, w, w, b, b, "gelu")


def test_unknown_backend():
    x, w, b = _inputs()
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'; valid backends: auto, cuda, triton, cpu, torch"):
        fastnn.linear_act(x, w, b, backend="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_backend_that_cannot_serve_the_call():
    x, w, b = _inputs()
    with pytest.raises(fastnn.BackendUnavailableError, match=r"backend 'cuda' cannot serve this call|backend 'cuda' is not available"):
        fastnn.linear_act(x, w, b, backend="cuda")


def test_cpu_backend_refuses_other_devices():
    x, w, b = (t.to("meta") for t in _inputs())
    with pytest.raises(fastnn.BackendUnavailableError, match=r"backend 'cpu' cannot serve this call: it runs on CPU tensors; these are on meta"):
        fastnn.linear_act(x, w, b, backend="cpu")


def test_device_mismatch():
    x, w, b = _inputs()
    with pytest.raises(ValueError, match=r"x is on cpu but weight is on meta"):
        fastnn.linear_act(x, w.to("meta"), b)


def test_glu_weight_shapes():
    x, w, b = _inputs()
    with pytest.raises(ValueError, match=r"gate_weight \(3, 5\) and up_weight \(4, 5\) must have the same shape"):
        fastnn.linear_glu(x, w, torch.randn(4, 5), None, None)
    with pytest.raises(ValueError, match=r"up_bias must have shape \(3,\)"):
        fastnn.linear_glu(x, w, w, b, torch.randn(5))


def test_raw_op_without_save_recomputes_in_backward():
    """save=False keeps the inputs and recomputes the pre-activation in backward."""
    x, w, b = _inputs()
    for t in (x, w, b):
        t.requires_grad_()
    for activation in ("gelu", "relu"):
        y, saved = torch.ops.fastnn.linear_act_fwd(x, w, b, activation, "cpu", False)
        assert saved.numel() == 0
        got = torch.autograd.grad(y.square().sum(), (x, w, b))
        want = torch.autograd.grad(fastnn.linear_act(x, w, b, activation, backend="torch").square().sum(), (x, w, b))
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r)


def test_meta_tensors_go_through_the_torch_backend():
    x, w, b = (t.to("meta") for t in _inputs())
    assert fastnn.linear_act(x, w, b).shape == (4, 3)


def test_triton_is_left_unimported_where_it_cannot_run(tmp_path):
    """With torch's CPU build and without TRITON_INTERPRET=1, the triton backend cannot serve a call:
    importing fastnn then skips Triton's kernels (and torch._inductor), and asking for the backend
    says why."""
    from fastnn.backends import triton as triton_backend

    if triton_backend.torch_built_for_gpu():
        pytest.skip("torch is built for a GPU here: the triton backend is imported")
    code = (
        "import sys, torch, fastnn\n"
        "from fastnn.backends import triton as tb\n"
        "assert 'fastnn.triton_kernels.linear_act' not in sys.modules and 'torch._inductor' not in sys.modules\n"
        "assert 'TRITON_INTERPRET=1' in tb.IMPORT_ERROR, tb.IMPORT_ERROR\n"
        "x, w = torch.randn(3, 5), torch.randn(4, 5)\n"
        "try:\n"
        "    fastnn.linear_act(x, w, None, 'relu', backend='triton')\n"
        "    raise SystemExit('no error')\n"
        "except fastnn.BackendUnavailableError as e:\n"
        "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "torch.testing.assert_close(fastnn.linear_act(x, w, None, 'relu'), torch.relu(x @ w.t()))\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("make,name", [(lambda: fastnn.FusedLinear(4, 8, activation="gelu"), "FusedLinear"),
                                       (lambda: fastnn.GatedLinear(4, 8, activation="swiglu"), "GatedLinear"),
                                       (lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), fastnn.FusedMLP(4, 8)),
                                        "FusedMLP")], ids=["FusedLinear", "GatedLinear", "FusedMLP-inside-a-model"])
def test_torch_jit_script_of_fastnn_modules_says_why(make, name):
    """TorchScript cannot compile fastnn's ops: scripting one of fastnn's own modules (alone or inside a
    model) is a TypeError naming the module and what takes it, not TorchScript's error about
    variable arguments."""
    with pytest.raises(TypeError, match=f"torch.jit.script cannot compile fastnn.{name}: .*torch.jit.trace"):
        torch.jit.script(make())
