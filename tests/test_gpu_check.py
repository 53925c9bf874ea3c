"""benchmarks/gpu_check.py --dry-run runs every section on the CPU at tiny sizes and writes its report."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADINGS = [
    "## 1. Device",
    "## 2. CUDA tests",
    "## 3. Matmul and FGN step throughput",
    "## 4. Linear probes against LogisticRegression",
    "## 5. ImageNet-sized probe",
]
# Method rows each section must hold, each with a number in its "seconds" (and "test acc (%)") column.
METHODS = {
    "## 3.": ["TF32 on", "TF32 off", "(gradient + CG)", "per-batch whitening"],
    "## 4.": [
        "FGNClassifier() [defaults]",
        "torch.optim.LBFGS",
        "LogisticRegression(lbfgs), array API",
        "LogisticRegression(lbfgs), CPU",
    ],
    "## 5.": ["FGNClassifier(random_state=0)", "host-copy input path"],
}


def _rows(section: str) -> list[dict]:
    """Body rows (column -> cell) of the markdown tables in one report section."""
    rows, columns = [], None
    for line in section.splitlines():
        if not line.startswith("|"):
            columns = None
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if columns is None:
            columns = cells
        elif not set(line) <= set("|-"):
            rows.append(dict(zip(columns, cells, strict=True)))
    return rows


def _is_number(cell: str) -> bool:
    return re.fullmatch(r"-?\d+(\.\d+)?(e[+-]?\d+)?", cell) is not None


def _section(report: str, heading: str) -> str:
    return report.split(heading, 1)[1].split("\n## ", 1)[0]


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "report.md"
    script = ROOT / "benchmarks" / "gpu_check.py"
    result = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = out.read_text()
    assert "**error**" not in report and "**budget**" not in report, report
    for heading in HEADINGS:
        assert heading in report, heading
    assert re.search(r"-> exit 0: \*\*\d+/\d+ tests collected", report), report
    for prefix, methods in METHODS.items():
        section = _section(report, next(h for h in HEADINGS if h.startswith(prefix)))
        rows = _rows(section)
        for method in methods:
            matching = [r for r in rows if method in r.get("method", r.get("measurement", ""))]
            assert matching, f"{prefix} has no row for {method!r}:\n{section}"
            for row in matching:
                assert _is_number(row["seconds"]), row
                if "test acc (%)" in row:
                    assert _is_number(row["test acc (%)"]), row
