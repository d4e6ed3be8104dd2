"""The benchmark's --quick run works end to end and writes its records."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the benchmark as a user runs it: no Triton interpreter
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture
def bench():
    """benchmarks/fused_linear.py as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fused_linear

    return fused_linear


def test_quick_run(tmp_path):
    out = tmp_path / "quick.json"
    csv_out = tmp_path / "quick.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fused_linear.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    env = data["environment"]
    assert env["device"] and env["torch"] and env["fastnn"]
    rows = data["rows"]
    configs = {r["config"]: r for r in rows if r["case"]["mode"] == "fwd"}
    for name in ("fastnn[cpu]", "eager", "compile", "onednn post-op", "bare GEMM", "bare GEMM, outputs kept"):
        assert configs[name]["status"] == "ok", configs[name]
        assert configs[name]["ms"] > 0
    bwd = {r["config"]: r for r in rows if r["case"]["mode"] == "fwd+bwd"}
    assert bwd["fastnn[cpu]"]["saved_mb"] > 0 and bwd["fastnn[cpu]"]["speedup_vs_eager"] > 0
    # the bare GEMMs with dY^T copied beforehand: a timed limit row, with no saved memory of its own
    copied = bwd["bare GEMM, dW lhs copied"]
    assert copied["status"] == "ok" and copied["ms"] > 0 and copied["saved_mb"] is None
    assert "bare GEMM, dW lhs copied" not in configs
    assert "fastnn[cpu]" in proc.stdout and "vs eager" in proc.stdout
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fused_linear.py"), "--quick", "--no-compile",
                           "--mode", "mlp", "--activation", "swiglu", "--out", str(csv_out)],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fastnn[cpu]" in csv_out.read_text()


def test_wrong_result_is_reported_not_timed(bench):
    import torch

    y = torch.ones(4, 4)
    ref = (torch.ones(4, 4, dtype=torch.float64),)
    assert bench.check((y,), ref, [0.0], "float32") is None
    assert "error" in bench.check((y * 1.01,), ref, [0.0], "float32")


def test_paired_ratio_cancels_drift(bench):
    drift = [1.0, 3.0, 1.5, 7.0, 2.0, 2.5]  # the machine's speed, round by round
    eager = [10.0 * d for d in drift]
    fast = [8.0 * d for d in drift]
    med, q1, q3 = bench.paired_ratio(eager, fast)
    assert med == q1 == q3 == 1.25
    med, q1, q3 = bench.paired_ratio([1.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    assert (med, q1, q3) == (2.0, 1.5, 3.0)


def test_profile_calls_runs(tmp_path):
    """benchmarks/profile_calls.py (the GPU check's profile stage) on this machine's backend: host
    time per call, the functions that spend it, and each configuration's wall time and operators,
    the MLP block's memory levels among them."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_calls.py"), "--shapes", "64x96x80",
                           "--mode", "fwd", "fwd+bwd", "mlp"], capture_output=True, text=True, timeout=300, env=ENV,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "host time per call" in proc.stdout and "failed" not in proc.stdout
    assert proc.stdout.count("eager") >= 6 and "aten::" in proc.stdout
    assert "where fastnn[cpu]'s host time goes" in proc.stdout and "functional.py:" in proc.stdout
    assert proc.stdout.count("us per call back to back") >= 6
    assert "fastnn.mlp[cpu] fc1: " in proc.stdout and "MlpFunctionBackward" in proc.stdout


def _compile_rows(bench, shapes):
    """The compile row of each fwd case at these shapes, run one after the other in this process."""
    args = bench.parse_args(["--quick", "--mode", "fwd", "--backends", "cpu", "--repeats", "1",
                             "--min-sample-ms", "0.1", "--shapes", *shapes])
    rows = []
    for m, k, n in args.shapes:
        case = bench.Case(m, k, n, "float32", "gelu", "fwd")
        rows.append(next(r for r in bench.run_case(case, args.device, args, lambda *a, **k: None)
                         if r.config == "compile"))
    return rows


def test_each_case_compiles_afresh(bench):
    """Every case's forward is one code object to dynamo, which compiles it at most recompile_limit
    times and then runs it eagerly: the benchmark resets dynamo per case, and its compile rows
    stay compiled past the limit (set to 1 here: the second case would have timed eager PyTorch)."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=1):
        rows = _compile_rows(bench, ["16x8x24", "24x16x8"])
    assert [r.status for r in rows] == ["ok", "ok"]


def test_a_compile_row_that_runs_eagerly_is_reported(bench, monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)  # the benchmark as it was
    with torch._dynamo.config.patch(recompile_limit=1):
        rows = _compile_rows(bench, ["16x8x24", "24x16x8"])
    assert rows[-1].status.startswith("failed: torch.compile compiled no graph"), rows[-1].status


def test_steady_state_runs_each_configuration_alone():
    """benchmarks/steady_state.py: a process per configuration and round, an A/B row run with the
    variable it names, and a configuration that cannot run reported as such."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "steady_state.py"), "--shapes", "64x32x96",
                           "--dtype", "float32", "--mode", "fwd+bwd", "--rounds", "2", "--warmup", "1", "--steps", "3",
                           "--configs", "eager", "fastnn[cpu]", "no such config",
                           "--ab", "FASTNN_CPU_BUFFER_CACHE_MIN_MB=32"],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("  ")]
    rows = {" ".join(f[:-5]): f[-5:] for f in lines if f[-1] == "ok"}
    assert set(rows) == {"eager", "fastnn[cpu]", "fastnn[cpu] FASTNN_CPU_BUFFER_CACHE_MIN_MB=32"}, proc.stdout
    for ms, vs_eager, _, faults, _ in rows.values():
        assert float(ms) > 0 and vs_eager.endswith("x") and faults.isdigit()
    assert rows["eager"][1] == "1.00x"
    assert any(line[:3] == ["no", "such", "config"] and "no configuration 'no such config'" in " ".join(line)
               for line in lines), proc.stdout


def test_bare_gemms_with_outputs_kept_write_the_same_outputs_every_call(bench):
    import torch

    case = bench.Case(8, 16, 24, "float32", "gelu", "mlp")
    inputs = bench.make_inputs(case, torch.device("cpu"))
    grad_out = bench.make_grad_out(case, torch.device("cpu"))
    kept = bench.bare_gemm_fn(case, inputs, grad_out, outputs_kept=True)
    first, second = kept(), kept()
    assert len(first) == 4 and [t.data_ptr() for t in first] == [t.data_ptr() for t in second]
    plain = bench.bare_gemm_fn(case, inputs, grad_out)()
    assert all(t.data_ptr() != p.data_ptr() and torch.equal(t, p) for t, p in zip(second, plain))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_activation_accuracy_runs(tmp_path, dtype):
    """benchmarks/activation_accuracy.py on a small range and shape, in each dtype it takes: the
    table rows, and fastnn's gelu values within the numerics rule's 2x PyTorch's error (16-bit: within
    0.53 ulp, correctly rounded but for a fraction of an ulp)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "activation_accuracy.py"), "--activation",
                           "gelu", "silu", "--lo", "0.5", "--hi", "0.5078125", "--dtype", dtype,
                           "--speed-shapes", "8x64"], capture_output=True, text=True, timeout=300, env=ENV,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(f"error in ulp of {dtype}") == 2
    assert proc.stdout.count(f"speed on 8x64 {dtype}") == 2
    worst = {key: float(next(line for line in proc.stdout.splitlines() if line.strip().startswith(key)).split()[2])
             for key in ("fastnn value", "torch value")}
    assert worst["fastnn value"] <= (2 * worst["torch value"] if dtype == "float32" else 0.53), proc.stdout
