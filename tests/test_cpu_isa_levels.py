"""Every instruction-set build of the CPU kernels that this CPU can run gives correct results:
each is forced in a subprocess with FASTNN_CPU_ISA and runs the activation checks, a slice of
the linear_act / linear_glu matrix, both forward GEMM orientations, the transpose and both
weight-gradient routes (the default run covers only the widest level)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastnn import _native

HERE = Path(__file__).resolve().parent
COMPILED = _native._C.build_info()["cpu_isas_compiled"].split(",") if _native._C is not None else []
ACTIVE = _native._C.build_info()["cpu_isa_active"] if _native._C is not None else None


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_isa_level(isa):
    if isa not in COMPILED:
        pytest.skip(f"{isa} build not compiled here")
    order = ["baseline", "avx2", "avx512", "avx512bf16"]
    if order.index(isa) > order.index(ACTIVE):
        pytest.skip(f"this CPU runs up to {ACTIVE}")
    env = dict(os.environ, FASTNN_CPU_ISA=isa)
    # one process: check that the level is the one running, then run the tests at it
    run = (f"import sys, fastnn, pytest; active = fastnn._native._C.build_info()['cpu_isa_active']; "
           f"assert active == {isa!r}, active; sys.exit(pytest.main(sys.argv[1:]))")
    proc = subprocess.run(
        [sys.executable, "-c", run, "-q", "-x", "-p", "no:cacheprovider", str(HERE / "test_activations.py"),
         str(HERE / "test_linear_act.py"), str(HERE / "test_linear_glu.py"), str(HERE / "test_cpu_product_orientation.py"),
         str(HERE / "test_cpu_wgrad.py"),
         "-k", "functor or mask or (matrix and (gelu or relu or swiglu)) or non_contiguous or gradcheck or "
         "both_orientations or transpose or wgrad"],
        env=env, capture_output=True, text=True, timeout=900, cwd=HERE)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]
