"""Shared helpers for the benchmark scripts: thread pinning, timing, tables, outputs.

Import this module FIRST in every benchmark script: it sets the OpenMP/MKL/
OpenBLAS thread environment variables before numpy or torch is imported, so
that every method in every script runs on the same number of threads
(``BENCH_THREADS``, default 1; these machines have 2 cores shared with other
work, and one thread gives the least noisy ratios).

Clock: on CPU every time reported is the CPU time of the benchmark process
(``time.process_time``; with one thread that is the work done, whatever else
the machine runs: wall-clock time on a shared 2-core machine swings by 2-5x
with other users' load). ``BENCH_CLOCK=wall`` switches to wall-clock time;
CUDA timings always use wall-clock time with synchronisation.
"""

from __future__ import annotations

import os
import sys

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
CLOCK = os.environ.get("BENCH_CLOCK", "cpu")
for _var in (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
):
    os.environ[_var] = str(THREADS)

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
FIGURES_DIR = BENCH_DIR / "figures"  # committed: RESULTS.md links these
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sklearn_fgn.core import flatten, unflatten  # noqa: E402, F401  (re-exported: the package's flat layout)

torch.set_num_threads(THREADS)
try:
    torch.set_num_interop_threads(THREADS)
except RuntimeError:  # already set (only allowed once per process)
    pass


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """Parse ``--quick`` (fast smoke run) plus any script-specific arguments."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small, fast smoke run")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def figure_path(name: str, quick: bool) -> Path:
    """PNG location: committed ``figures/`` for full runs, ``out/figures/`` for ``--quick``."""
    folder = OUT_DIR / "figures" if quick else FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def sync(device) -> None:
    """Wait for queued kernels (CUDA); no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def now(device="cpu") -> float:
    """The benchmark clock: process CPU seconds on CPU (see module docstring), wall-clock on CUDA."""
    if CLOCK == "wall" or torch.device(device).type == "cuda":
        return time.perf_counter()
    return time.process_time()


def clock_name() -> str:
    """What :func:`now` measures, for report headers."""
    if CLOCK == "wall":
        return "wall-clock seconds"
    return f"CPU seconds of the benchmark process ({THREADS} thread{'s' if THREADS > 1 else ''})"


def time_call(fn, *, repeats: int = 5, warmup: int = 1, device="cpu") -> float:
    """Median seconds (:func:`now`) of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = now(device)
        fn()
        sync(device)
        times.append(now(device) - start)
    return statistics.median(times)


def fmt(value, digits: int = 3) -> str:
    """Compact number formatting for markdown tables."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a" if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Render a list of dicts as a GitHub markdown table."""
    columns = columns or list(rows[0])

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(fmt(row.get(c, ""))) for c in columns) + " |")
    return "\n".join(lines)


def write_outputs(name: str, rows: list[dict], markdown: str, summary: dict, quick: bool) -> None:
    """Write ``out/<name>.md``, ``out/<name>.csv`` and ``out/<name>.json`` (summary + findings).

    ``--quick`` runs write ``<name>_quick.*`` so they never overwrite a full run.
    """
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_quick" if quick else name
    (OUT_DIR / f"{stem}.md").write_text(markdown + "\n")
    if rows:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(OUT_DIR / f"{stem}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    (OUT_DIR / f"{stem}.json").write_text(json.dumps(summary, indent=2, default=float))


def machine_description() -> str:
    """CPU model, core count, load average, torch/numpy versions and the thread setting in one line."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{model}, {os.cpu_count()} logical cores (load average {load} when measured); "
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}; "
        f"torch.set_num_threads({torch.get_num_threads()}), OMP/MKL/OPENBLAS_NUM_THREADS={THREADS}"
    )


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (the growth exponent)."""
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def image_link(path: Path, alt: str) -> str:
    """Markdown image link relative to ``benchmarks/`` (where RESULTS.md lives)."""
    return f"![{alt}]({path.relative_to(BENCH_DIR).as_posix()})"
