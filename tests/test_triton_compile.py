"""Tier 3 for Triton: every kernel variant the backend launches (bf16 and float32 with TF32, relu's
mask and gelu's derivative, training and decode shapes, the TMA path on sm_90) compiled ahead of
time for sm_90a and sm_80 with no GPU, in every autotune config the pruner keeps: no compile error,
no config over the target's shared memory (tests/triton_aot.py; its report lists registers and
spills). The two targets compile in parallel subprocesses (the interpreter is off there)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
nvidia = pytest.importorskip("triton.backends.nvidia")

SCRIPT = Path(__file__).with_name("triton_aot.py")


@pytest.mark.skipif(not (Path(nvidia.__file__).parent / "bin" / "ptxas").exists(),
                    reason="this Triton wheel ships no ptxas")
def test_every_kernel_compiles_for_sm90a_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = {arch: subprocess.Popen([sys.executable, str(SCRIPT), "--arch", str(arch), "--quick", "--json",
                                     str(tmp_path / f"sm{arch}.json")], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
             for arch in (90, 80)}
    for arch, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        print(out.splitlines()[0] if out else "")
        assert proc.returncode == 0, out[-4000:]
        report = json.loads((tmp_path / f"sm{arch}.json").read_text())
        kernels = {k["kernel"] for k in report["kernels"]}
        expected = {"linear_act_fwd_kernel", "linear_splitk_kernel", "splitk_epilogue_kernel",
                    "linear_act_dgrad_kernel", "linear_act_wgrad_kernel", "linear_glu_fwd_kernel"}
        if arch == 90:
            expected.add("linear_act_fwd_tma_kernel")
        assert expected <= kernels, (arch, kernels)
        assert not report["failures"]
