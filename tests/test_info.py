import subprocess
import sys

import fastnn
from fastnn import info
from fastnn.backends import cpu as cpu_backend


def test_info_runs_and_reports(tmp_path):
    # run away from the repository root, whose unbuilt fastnn/ would shadow the installed one
    proc = subprocess.run([sys.executable, "-m", "fastnn.info"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"fastnn {fastnn.__version__}" in out
    assert "native CPU kernels: ISA levels compiled baseline" in out
    assert "auto picks" in out and "cpu/float32" in out
    assert "cpu backend, 16-bit GEMMs: bfloat16: " in out
    assert "cpu backend, huge pages: " in out
    assert "cpu backend, buffer cache: " in out
    data = info.collect()
    assert data["auto_picks_for_gelu"]["cpu/float32"] == "cpu"
    assert data["native"]["cpu"]["cpu_isa_active"] in ("baseline", "avx2", "avx512", "avx512bf16")


def test_info_says_the_16bit_gemm_route(monkeypatch):
    monkeypatch.setattr(cpu_backend, "GEMM16_OVERRIDE", "float32")
    assert info.collect()["cpu_16bit_gemm"]["bfloat16"].startswith("float32 GEMM")
    monkeypatch.setattr(cpu_backend, "GEMM16_OVERRIDE", "native")
    monkeypatch.setattr(cpu_backend, "_has_amx", lambda: True)
    assert info.collect()["cpu_16bit_gemm"]["bfloat16"].startswith("torch's own 16-bit GEMM; dW from a row-major copy")
    assert info.collect()["cpu_16bit_gemm"]["float16"] == "torch's own 16-bit GEMM; dW from the view dZ.t()"


def test_info_says_whether_huge_pages_are_asked_for(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_madvise", lambda: print)
    assert info.collect()["cpu_huge_pages"].startswith("asked for")
    monkeypatch.setattr(cpu_backend, "_madvise", lambda: None)
    monkeypatch.setenv("FASTNN_CPU_HUGEPAGES", "0")
    assert info.collect()["cpu_huge_pages"] == "off (FASTNN_CPU_HUGEPAGES=0)"
    monkeypatch.setenv("FASTNN_CPU_HUGEPAGES", "1")
    assert info.collect()["cpu_huge_pages"].startswith("not asked for")

