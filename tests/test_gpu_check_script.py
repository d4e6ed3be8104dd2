"""The prepared GPU script's own logic, dry-run on any machine (its GPU stages print their command
instead of running): the stages in order, within the run's budget, the caching allocator off under
the sanitizer, and a summary that names every failing stage: a failed build stops the run, any
other failing stage does not (one short lease should show every stage)."""
import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _run(tmp_path, **env):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, GPU_CHECK_DRY_RUN="1", PATH=os.environ["PATH"], **env))
    return proc, out


def test_dry_run_runs_every_stage_in_order(tmp_path):
    proc, out = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    stages = [line.split()[1] for line in summary.splitlines() if line.startswith("== ")]
    assert stages == ["build", "info", "tests", "bench", "bench_mlp", "profile", "sanitizer"]
    assert "CHECK_SECONDS:-480" in SCRIPT.read_text()  # the whole check ends inside 8 minutes (10 per device call)
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer" in (out / "sanitizer.log").read_text()
    assert "FASTNN_PATHS_LOG=" in (out / "tests.log").read_text()
    assert "every stage passed" in summary


def test_stage_limits_are_cut_to_the_budget(tmp_path):
    proc, out = _run(tmp_path, CHECK_SECONDS="100")
    summary = (out / "summary.txt").read_text()
    limits = [int(line.split("limit ")[1].split("s)")[0]) for line in summary.splitlines() if line.startswith("== ")]
    assert len(limits) == 7 and max(limits) <= 100


def test_a_failing_stage_is_named_and_the_run_goes_on(tmp_path):
    proc, out = _run(tmp_path, GPU_CHECK_FAIL_AT="tests")
    assert proc.returncode != 0
    summary = (out / "summary.txt").read_text()
    stages = [line.split()[1] for line in summary.splitlines() if line.startswith("== ")]
    assert stages == ["build", "info", "tests", "bench", "bench_mlp", "profile", "sanitizer"]
    assert "failing stages: tests;" in summary and "every stage passed" not in summary


def test_a_failed_build_stops_the_run(tmp_path):
    proc, out = _run(tmp_path, GPU_CHECK_FAIL_AT="build")
    assert proc.returncode != 0
    summary = (out / "summary.txt").read_text()
    assert "failing stages: build" in summary and "== info" not in summary and "== tests" not in summary
