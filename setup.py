"""Build: setuptools drives CMake (Ninja) to build fastnn._C and, where nvcc and cuBLASLt are
found, fastnn._cuda. Environment:
  FASTNN_CUDA=0 / 1     skip the CUDA part / require it (default: build it when found)
  FASTNN_CUDA_ARCHS     CUDA architectures, e.g. "80;90" (default: TORCH_CUDA_ARCH_LIST, else 80;90)
  FASTNN_CUBLAS_ROOT    a folder holding include/cublasLt.h and lib/libcublasLt.so*
  FASTNN_BUILD_JOBS     parallel compile jobs
"""
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "fastnn" / "_version.py").read_text()).group(1)


def _tool(module, attr, name):
    """The cmake / ninja executable from their PyPI packages (build requirements), else PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return name


def _cuda_mode():
    value = os.environ.get("FASTNN_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "AUTO"
    if value in ("1", "on", "true", "yes"):
        return "ON"
    if value in ("0", "off", "false", "no"):
        return "OFF"
    raise SystemExit(f"FASTNN_CUDA={value!r}: use 0, 1 or auto")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """One CMake build makes every module; fastnn._cuda is optional (built when nvcc and cuBLASLt
    are found), so setuptools is told about it only when CMake produced it."""

    def build_extensions(self):
        self._cmake(self.extensions[0])
        for ext in list(self.extensions):
            if not Path(self.get_ext_fullpath(ext.name)).exists():
                if ext.name != "fastnn._cuda":
                    raise RuntimeError(f"the CMake build did not produce {ext.name}")
                self.extensions.remove(ext)

    def _cmake(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        for stale in out_dir.glob("_cuda*.so"):  # a module from an earlier build with other settings
            stale.unlink()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        args = [
            cmake, str(ROOT), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTNN_OUTPUT_DIR={out_dir}",
            f"-DFASTNN_VERSION={VERSION}",
            f"-DFASTNN_CUDA={_cuda_mode()}",
        ]
        archs = os.environ.get("FASTNN_CUDA_ARCHS") or _archs_from_torch_list(os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
        if archs:
            args.append(f"-DFASTNN_CUDA_ARCHS={archs}")
        if os.environ.get("FASTNN_CUBLAS_ROOT"):
            args.append(f"-DFASTNN_CUBLAS_ROOT={os.environ['FASTNN_CUBLAS_ROOT']}")
        subprocess.check_call(args, cwd=build_dir)
        jobs = os.environ.get("FASTNN_BUILD_JOBS") or str(os.cpu_count() or 2)
        subprocess.check_call([cmake, "--build", ".", "-j", jobs], cwd=build_dir)


def _archs_from_torch_list(value):
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") -> CMake's CUDA_ARCHITECTURES ("80-real;90")."""
    out = []
    for item in re.split(r"[;\s]+", value.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.replace("+PTX", "").replace(".", "")
        if num.isdigit():
            out.append(num if ptx else f"{num}-real")
    return ";".join(out)


setup(
    version=VERSION,
    ext_modules=[CMakeExtension("fastnn._C"), CMakeExtension("fastnn._cuda")],
    cmdclass={"build_ext": CMakeBuild},
)
