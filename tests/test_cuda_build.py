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


@pytest.mark.skipif(not _nvcc(), reason="nvcc not found: tier 3 needs the CUDA compiler")
def test_cuda_sources_compile(tmp_path):
    import cmake
    import ninja
    import pybind11

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
    built = list((tmp_path / "out").glob("_cuda*.so"))
    assert built, "no fastnn._cuda module was produced"
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(built[0])], capture_output=True, text=True)
    assert "cublasLtMatmul" in nm.stdout  # linked against cuBLASLt, not stubbed out
