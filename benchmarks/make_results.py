"""Run every paper benchmark (and step_cost) and regenerate benchmarks/RESULTS.md.

    python benchmarks/make_results.py            # full run (~10-15 min on 2 cores)
    python benchmarks/make_results.py --quick    # smoke run -> benchmarks/out/RESULTS_quick.md

Each script runs in its own process (so thread settings and the clock are set
before numpy/torch load) with the same ``BENCH_THREADS`` (default 1) and
writes its table and summary to ``benchmarks/out/``; its PNG goes to
``benchmarks/figures/`` (committed, linked from RESULTS.md). This script then
assembles RESULTS.md: the machine, a claims-vs-measurements table built from
each script's JSON summary, and every script's tables; the block between the
"kept" markers at its end (the linear-probe, exact-fit and CV benchmarks, which
run for tens of minutes on their own) is carried over as it is. Numbers come
from the runs, never from the paper. A script that fails is reported as failed in
RESULTS.md and the others still run.
"""

from __future__ import annotations

# _common must be imported first: it sets the thread env vars before numpy/torch load.
# ruff: noqa: I001
import _common  # noqa: F401
from _common import BENCH_DIR, OUT_DIR, clock_name, machine_description, markdown_table, parse_args

import datetime
import json
import os
import subprocess
import sys
import time


SCRIPTS = [
    ("step_cost", "Step cost in matmul equivalents (issue 2)"),
    ("paper_binary_exactness", "Binary exactness: FGN = full GGN for K = 2"),
    ("paper_mechanism", "Mechanism: FGN vs full GGN against concentration and damping"),
    ("paper_fixed_features", "Fixed-feature head: training curves"),
    ("paper_class_scaling", "Class scaling: time and memory per step against K"),
    ("paper_mlp_peers", "MLP head: survey peers (Adam, SGD, Rank-1, Shampoo, K-FAC) vs FGN and GGN"),
]


def run_script(name: str, quick: bool) -> dict:
    """Run one benchmark script; return its status, wall time and log path."""
    logs = OUT_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(BENCH_DIR / f"{name}.py")] + (["--quick"] if quick else [])
    start = time.perf_counter()
    with open(logs / f"{name}{'_quick' if quick else ''}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), check=False)
    seconds = time.perf_counter() - start
    print(
        f"{name}: {'ok' if proc.returncode == 0 else f'FAILED ({proc.returncode})'} in {seconds:.0f} s",
        flush=True,
    )
    return {"name": name, "ok": proc.returncode == 0, "seconds": seconds, "log": log.name}


def load(name: str, quick: bool) -> tuple[str, dict]:
    stem = f"{name}_quick" if quick else name
    md = (OUT_DIR / f"{stem}.md").read_text()
    summary = json.loads((OUT_DIR / f"{stem}.json").read_text())
    return md, summary


def section_body(md: str, quick: bool) -> str:
    """A script's markdown without its machine line (stated once at the top)."""
    lines = [line for line in md.splitlines() if not line.startswith("Machine: ")]
    body = "\n".join(lines).strip()
    return body.replace("](out/", "](") if quick else body


def build(results: list[dict], quick: bool, total: float) -> str:
    claims, sections = [], []
    for (name, title), status in zip(SCRIPTS, results, strict=True):
        header = f"## {title}\n\n`python benchmarks/{name}.py` ({status['seconds']:.0f} s wall)\n\n"
        if not status["ok"]:
            sections.append(header + f"**FAILED**: see `benchmarks/out/logs/{status['log'].split('/')[-1]}`.")
            claims.append(
                {"claim": title, "measured": "script failed", "verdict": "not measured", "where": name}
            )
            continue
        md, summary = load(name, quick)
        for c in summary.get("claims", []):
            claims.append({**c, "where": f"[{name}](#{anchor(title)})"})
        sections.append(header + section_body(md, quick))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    intro = (
        "# Benchmark results: FGN against the full GGN and the survey's peers\n\n"
        f"Generated {stamp} by `python benchmarks/make_results.py{' --quick' if quick else ''}` "
        f"in {total / 60:.1f} min. Every number below comes from these runs, none from the paper. "
        "Each script also runs alone (`python benchmarks/<script>.py [--quick]`) and writes its table, "
        "CSV and "
        "JSON to `benchmarks/out/`.\n\n"
        f"**Machine**: {machine_description()}.\n\n"
        f"**Timing**: {clock_name()}, pinned identically for every method (torch.set_num_threads and "
        "OMP/MKL/OPENBLAS_NUM_THREADS set before numpy loads). The machine is shared with other work, "
        "so read ratios and medians, not absolute times; wall-clock times swing with other users' load, "
        "CPU time of a single-threaded process much less.\n\n"
        "## Paper claims against our measurements\n\n"
        "Paper: Zanon and Korbit, *Fast Gauss-Newton for Multiclass Cross-Entropy*, arXiv 2605.06081 "
        "(claims as stated in its abstract and summary; issue 2's targets are this project's).\n\n"
        + markdown_table(claims, ["claim", "measured", "verdict", "where"])
        + "\n"
    )
    return intro + "\n" + "\n\n".join(sections) + "\n"


KEEP_BEGIN, KEEP_END = "<!-- kept: not generated by make_results.py -->", "<!-- /kept -->"


def kept_sections(path) -> str:
    """The block of RESULTS.md between the KEEP markers (the probe benchmarks, run on their own), if any."""
    text = path.read_text() if path.exists() else ""
    if KEEP_BEGIN not in text or KEEP_END not in text:
        return ""
    return "\n" + text[text.index(KEEP_BEGIN) : text.index(KEEP_END) + len(KEEP_END)] + "\n"


def anchor(title: str) -> str:
    """GitHub-style heading anchor."""
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -")
    return keep.replace(" ", "-")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    start = time.perf_counter()
    results = [run_script(name, args.quick) for name, _ in SCRIPTS]
    total = time.perf_counter() - start
    text = build(results, args.quick, total)
    target = OUT_DIR / "RESULTS_quick.md" if args.quick else BENCH_DIR / "RESULTS.md"
    target.write_text(text + kept_sections(BENCH_DIR / "RESULTS.md"))
    print(f"wrote {target} ({total / 60:.1f} min)")
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
