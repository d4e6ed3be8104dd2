"""Renders committed benchmark records (benchmarks/results/*.json) as markdown tables and, with
--readme, writes them into README.md between the results markers, so that the README's numbers
always come from a record and are never edited by hand.

    python benchmarks/render_results.py benchmarks/results/2026-11-28-cpu-*.json --readme
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _f(v, spec, suffix=""):
    return "—" if v is None else format(v, spec) + suffix


def render(path: Path) -> str:
    data = json.loads(path.read_text())
    env, rows = data["environment"], data["rows"]
    isa = (env.get("fastnn_cpu_build") or {}).get("cpu_isa_active") if env.get("device_type") == "cpu" else None
    device = f"{env['device']}, {isa} kernels" if isa else env["device"]
    out = [f"**{device}** — torch {env['torch']}, fastnn {env['fastnn']} ({env['git_commit']}), "
           f"{env['date']} — record `{path.relative_to(ROOT)}`", ""]
    cases = []
    for r in rows:
        c = r["case"]
        key = (c["m"], c["k"], c["n"], c["dtype"], c["activation"], c["mode"])
        if key not in cases:
            cases.append(key)
    out.append("| M×K×N | dtype | act | mode | config | ms | TFLOP/s | vs eager (IQR) | / GEMM | saved MB | KiB/token | "
               "status |")
    out.append("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for key in cases:
        for r in rows:
            c = r["case"]
            if (c["m"], c["k"], c["n"], c["dtype"], c["activation"], c["mode"]) != key or r["status"].startswith("n/a"):
                continue
            status = "ok" if r["status"] == "ok" else r["status"].split(":")[0]
            per_token = None if r["saved_mb"] is None else r["saved_mb"] * 1024 / max(c["m"], 1)
            speedup = _f(r['speedup_vs_eager'], '.2f', 'x')
            quartiles = r.get("speedup_quartiles") or []  # records from before paired ratios have none
            if len(quartiles) == 2 and r["config"] != "eager":
                speedup += f" ({quartiles[0]:.2f}-{quartiles[1]:.2f})"
            out.append(f"| {c['m']}×{c['k']}×{c['n']} | {c['dtype']} | {c['activation']} | {c['mode']} | {r['config']} | "
                       f"{_f(r['ms'], '.2f')} | {_f(r['tflops'], '.3f')} | {speedup} | "
                       f"{_f(r['ratio_to_gemm'], '.2f', 'x')} | {_f(r['saved_mb'], '.1f')} | {_f(per_token, '.2f')} | {status} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+", type=Path)
    p.add_argument("--readme", action="store_true", help="write the tables into README.md")
    args = p.parse_args(argv)
    text = "\n\n".join(render(r.resolve()) for r in args.records)
    if not args.readme:
        print(text)
        return 0
    readme = ROOT / "README.md"
    s = readme.read_text()
    if BEGIN not in s or END not in s:
        print(f"README.md has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    s = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", s, flags=re.S)
    readme.write_text(s)
    print(f"wrote {len(args.records)} record(s) into README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
