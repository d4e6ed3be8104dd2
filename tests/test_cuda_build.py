"""Tier 3: the CUDA sources compile and link (fastnn._cuda), on any machine with nvcc, GPU or
not, against cuBLASLt's headers (the nvidia-cublas wheel of the test extra, or FASTNN_CUBLAS_ROOT).
CMake is run directly, so this checks the sources of this checkout whatever the installed build did."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvcc():
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")


needs_nvcc = pytest.mark.skipif(not _nvcc(), reason="nvcc not found: tier 3 needs the CUDA compiler")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """This checkout's fastnn._cuda, built by CMake: the path of the module."""
    import cmake
    import ninja
    import pybind11

    tmp_path = tmp_path_factory.mktemp("cuda_build")
    cmake_bin = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    env = dict(os.environ, CUDACXX=_nvcc())
    configure = subprocess.run(
        [cmake_bin, str(ROOT), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}",
         "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DFASTNN_OUTPUT_DIR={tmp_path / 'out'}", "-DFASTNN_CUDA=ON"]
        + ([f"-DFASTNN_CUBLAS_ROOT={os.environ['FASTNN_CUBLAS_ROOT']}"] if os.environ.get("FASTNN_CUBLAS_ROOT") else []),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    assert "CUDA part built" in configure.stdout
    build = subprocess.run([cmake_bin, "--build", ".", "--target", "_cuda", "-j", "2"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-6000:] + build.stderr[-3000:]
    found = list((tmp_path / "out").glob("_cuda*.so"))
    assert found, "no fastnn._cuda module was produced"
    return found[0]


@needs_nvcc
def test_cuda_sources_compile(built):
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(built)], capture_output=True, text=True)
    assert "cublasLtMatmul" in nm.stdout  # linked against cuBLASLt, not stubbed out


def _import_built(path):
    """The built module, imported here without a GPU: its CUDA runtime is linked in and loads the
    driver on its first CUDA call; cuBLASLt comes from the nvidia-cublas wheel."""
    import importlib.util

    from fastnn import _native

    if not _native._preload_cublaslt():
        pytest.skip("no libcublasLt to load (the nvidia-cublas wheel of the test extra)")
    spec = importlib.util.spec_from_file_location("_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_nvcc
def test_built_module_answers_as_the_standin(built):
    """The CPU stand-in for fastnn._cuda (tests/cuda_standin.py), on which the cuda backend's Python
    is tested, against the built module where no GPU is needed: the bias gradients' scratch sizes,
    lt_gemm's argument checks and empty shapes, and the kernels' dtype and activation codes, all
    answered before any CUDA call (the same exception type, or the same return value). (The
    kernels' empty shapes are answered after the binding's cudaSetDevice: GPU machines only.)"""
    from cuda_standin import CudaStandIn
    from fastnn.backends import cuda as cb

    real, standin = _import_built(built), CudaStandIn()
    for rows in (0, 1, 15, 16, 17, 32, 33, 1000, 16384, 16385, 16400, 100_000, 10**6):
        for cols in (1, 7, 3072):
            assert real.bias_grad_scratch_elems(rows, cols) == standin.bias_grad_scratch_elems(rows, cols), (rows, cols)

    def gemm(m=4, n=5, k=3, epilogue=cb.NONE, dtype=2, accumulate=False, bias=0, bias_grad=0, aux=0):
        return (0, 0, dtype, False, m, n, k, 8, k, False, 8, k, True, 8, n, accumulate, epilogue, bias, bias_grad,
                aux, 128, 8, 1 << 20)

    def kernel(dtype=2, act=1, rows=0, cols=5):
        return (0, 0, dtype, act, rows, cols)

    cases = [
        ("lt_gemm", gemm(m=-1)), ("lt_gemm", gemm(epilogue=13)), ("lt_gemm", gemm(epilogue=-1)),
        ("lt_gemm", gemm(dtype=3)), ("lt_gemm", gemm(epilogue=cb.RELU_AUX_BIAS, bias=8)),
        ("lt_gemm", gemm(epilogue=cb.DGELU_BGRAD, aux=8)), ("lt_gemm", gemm(epilogue=cb.BGRADB)),
        ("lt_gemm", gemm(epilogue=cb.GELU_BIAS)), ("lt_gemm", gemm(epilogue=cb.BIAS, bias=8, accumulate=True)),
        ("lt_gemm", gemm(m=0)), ("lt_gemm", gemm(n=0, epilogue=cb.BGRADB, bias_grad=8)),
        ("lt_gemm", gemm(m=0, epilogue=cb.BGRADB, bias_grad=8)), ("lt_gemm", gemm(k=0)),
        ("bias_act_forward", kernel(dtype=3) + (8, 5, 0, 8, 5, 0, 128)),
        ("bias_act_forward", kernel(act=99) + (8, 5, 0, 8, 5, 0, 128)),
        ("act_backward", kernel(act=-1) + (8, 5, 8, 5, 0, 128, 8, 5, 8, 0)),
        ("glu_forward", kernel(dtype=-1) + (8, 8, 8)), ("glu_forward", kernel(act=10) + (8, 8, 8)),
        ("glu_backward", kernel(dtype=5) + (8,) * 9),
    ]
    for name, args in cases:
        answers = []
        for module in (real, standin):
            try:
                answers.append(("returned", getattr(module, name)(*args)))
            except (ValueError, RuntimeError) as exc:
                answers.append(("raised", type(exc)))
        assert answers[0] == answers[1], (name, args, answers)
