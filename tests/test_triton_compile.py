"""Tier 3 for Triton: every kernel variant the backend launches (bf16 and float32 with TF32, relu's
mask and gelu's derivative, training and decode shapes, split-K, wgrad split over M, the TMA path
on sm_90) compiled ahead of time for sm_90a and sm_80 with no GPU, in every autotune config the
pruner keeps: no compile error, no config over the target's shared memory (tests/triton_aot.py; its
report lists registers and spills). The two targets compile in parallel subprocesses (the
interpreter is off there).

It runs with the Triton installed here (the newest pip gives) and with the oldest one fastnn supports
on a GPU, Triton 3.6 (torch 2.11's): FASTNN_TRITON_OLDEST names a directory holding it
(`pip install --target DIR triton==3.6.0`; the README's test command does this), put first on the
subprocesses' path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
nvidia = pytest.importorskip("triton.backends.nvidia")

SCRIPT = Path(__file__).with_name("triton_aot.py")
OLDEST = "3.6.0"


def _triton_path(which):
    if which == "installed":
        if not (Path(nvidia.__file__).parent / "bin" / "ptxas").exists():
            pytest.skip("this Triton wheel ships no ptxas")
        return None
    path = os.environ.get("FASTNN_TRITON_OLDEST")
    if not path:
        message = f"FASTNN_TRITON_OLDEST is not set (a directory with triton=={OLDEST} installed by pip --target)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must compile with the oldest supported Triton too")
        pytest.skip(message)
    return str(Path(path).resolve())


@pytest.mark.parametrize("which", ["installed", "oldest"])
def test_every_kernel_compiles_for_sm90a_and_sm80(tmp_path, which):
    path = _triton_path(which)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if path:
        env["PYTHONPATH"] = os.pathsep.join([path] + [p for p in [env.get("PYTHONPATH")] if p])
    procs = {arch: subprocess.Popen([sys.executable, str(SCRIPT), "--arch", str(arch), "--quick", "--json",
                                     str(tmp_path / f"sm{arch}.json")], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
             for arch in (90, 80)}
    for arch, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        print(out.splitlines()[0] if out else "")
        assert proc.returncode == 0, out[-4000:]
        report = json.loads((tmp_path / f"sm{arch}.json").read_text())
        if which == "oldest":
            assert report["triton"] == OLDEST, report["triton"]
        kernels = {k["kernel"] for k in report["kernels"]}
        expected = {"linear_act_fwd_kernel", "linear_splitk_kernel", "splitk_epilogue_kernel",
                    "linear_act_dgrad_kernel", "linear_act_wgrad_kernel", "linear_glu_fwd_kernel", "sum_splits_kernel"}
        if arch == 90:
            expected.add("linear_act_fwd_tma_kernel")
        assert expected <= kernels, (arch, kernels)
        assert not report["failures"]
