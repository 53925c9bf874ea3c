"""GPU check: CUDA tests, matmul and FGN-step throughput, linear probes against peers, an ImageNet-sized fit.

What is measured
----------------
One script for a machine with one CUDA GPU, sized to finish in about 7 minutes:
``--budget-seconds`` (default 420) is split over the sections (2 / 15 / 8 / 50 / 25 %);
each section, and each fit inside sections 4 and 5, stops at its share and the report
says where it did. Sections, in order:

1. Device: GPU name, memory and compute capability; torch, CUDA, cuDNN, scikit-learn,
   scipy and numpy versions; the CPU.
2. CUDA tests: ``python -m pytest -q -p no:cacheprovider tests -k cuda`` in a subprocess
   (without ``SCIPY_ARRAY_API``); its pass/skip/fail line, and the lines of failed tests.
3. Throughput: an (8192, 1024) @ (1024, 1000) float32 matmul with TF32 allowed and with
   TF32 disabled (2 N d K flops; best of 5 runs of 20 back-to-back products). Then one
   epoch (16 steps) of ``FGNClassifier(device="cuda", batch_size=4096, max_iter=1,
   early_stopping=False)`` on a 65536 x 1024 x 1000 float32 class-means problem, its
   epoch time and CG iterations read from the estimator's ``verbose=1`` line. Flop model
   per step of b rows: gradient 4 b d K (the logits and the weight-gradient matmuls),
   each CG iteration 4 b d K (one JVP and one VJP); the achieved rate is given as a
   share of both matmul rates, and once more with the per-batch whitening of the
   linear head's ``damping_metric="features"`` (2 b d^2 per step) counted.
4. Linear probe 100000 x 512 x 1000 (stratified 80/20 split), float32, twice: isotropic
   standardised ``load_problem("100000x512x1000", class_sep=3.0)`` and embedding-like raw
   ``load_problem("emb:100000x512x1000:2")`` (``benchmarks/_data.py``). Methods, in this
   order: ``FGNClassifier(device="cuda", random_state=0)`` with default settings (it takes
   the host arrays: its time includes the copy to the GPU); ``torch.optim.LBFGS`` full batch
   on the GPU (``nn.Linear`` from zero, cross-entropy + alpha/2 ||W||^2 with
   alpha = 1/(C n), lr 1, history 10, strong Wolfe, max_iter 500); scikit-learn's
   ``LogisticRegression(C=C, max_iter=1000)`` (lbfgs) on CUDA torch tensors through the
   array API (``SCIPY_ARRAY_API=1``, ``config_context(array_api_dispatch=True)``); the same
   on the host arrays on the CPU with all cores (the reference). ``C`` is ``--C``
   (default 1). Reported: test accuracy, fit seconds, time and accuracy against the CPU fit.
5. ImageNet-sized probe: 1281167 x 1024 float32, 1000 classes (class means with norm about
   4.8 plus unit Gaussian noise), generated on the GPU in chunks, with 50000 held-out test
   rows. ``FGNClassifier(device="cuda", random_state=0)`` is given CUDA tensors first; if
   that raises TypeError or ValueError, a host numpy copy built chunk by chunk is given
   instead, and the report says which. One epoch is timed, then as many more
   (``warm_start=True``) as the section's budget leaves room for. Reported: seconds, epochs,
   peak GPU memory (``torch.cuda.max_memory_allocated`` from just before the first fit, the
   training data included when it stays on the GPU) and test accuracy.

Timings are wall-clock seconds, with ``torch.cuda.synchronize`` before and after GPU
work; every GPU fit follows an untimed warm-up fit on a few thousand rows. Every section
catches its own exceptions (CUDA out-of-memory included) and records them; the report is
rewritten after each section, so a run cut short still leaves the sections it finished.

Run::

    python benchmarks/gpu_check.py --install     # GPU machine: pip install (see below), then the check
    python benchmarks/gpu_check.py --budget-seconds 300
    python benchmarks/gpu_check.py --dry-run     # CPU only: every section at tiny sizes, under a minute
    python benchmarks/gpu_check.py --sections probe imagenet --budget-seconds 200   # a subset

``--install`` runs ``python -m pip install -e ".[test]" array-api-compat`` first (torch is not
pinned: the machine keeps its own CUDA build) and, if that fails (no network), ``pip install
--no-build-isolation --no-deps -e .``. ``--dry-run`` runs every code path on the CPU at tiny
sizes (2000 x 32 x 10 probes, 5000 x 64 x 10 for section 5) and replaces the test run by
``pytest --collect-only -q -k cuda``. Output: ``benchmarks/out/gpu_check.md`` (``--out``), also
printed. Exit status: 0, or 1 when a section or a fit raised or a CUDA test failed, or 2
without CUDA (and without ``--dry-run``).
"""

from __future__ import annotations

import os
import subprocess
import sys

# Before scipy or scikit-learn is imported: the array-API LogisticRegression needs it.
os.environ["SCIPY_ARRAY_API"] = "1"
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
INSTALL_COMMANDS = (
    [sys.executable, "-m", "pip", "install", "-e", ".[test]", "array-api-compat"],
    [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
)


def install() -> None:
    """pip install the package and its test extra; the offline fallback installs the package alone."""
    for command in INSTALL_COMMANDS:
        print("$ " + " ".join(command), flush=True)
        try:
            rc = subprocess.run(command, cwd=REPO_ROOT, timeout=300).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout (300 s)"
        print(f"-> exit {rc}", flush=True)
        if rc == 0:
            return


if __name__ == "__main__" and "--install" in sys.argv:
    install()  # before numpy, torch and scikit-learn are imported

sys.path.insert(0, BENCH_DIR)
from _threads import preset_threads  # noqa: E402

preset_threads(sys.argv, default=str(os.cpu_count() or 1))  # all cores for the CPU reference

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import _common  # noqa: E402  (sets the thread variables, imports numpy and torch)
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
from _data import load_problem  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from sklearn_fgn import FGNClassifier  # noqa: E402

DEFAULT_OUT = Path(BENCH_DIR) / "out" / "gpu_check.md"
# Section shares of --budget-seconds.
SHARES = {"device": 0.02, "tests": 0.15, "throughput": 0.08, "probe": 0.50, "imagenet": 0.25}
MIN_FIT_SECONDS = 3.0  # a fit is skipped when less than this is left of its section
# Class means ~ N(0, MEAN_NORM^2 / d I), so ||mu_i - mu_j|| is about MEAN_NORM * sqrt(2) against unit noise.
MEAN_NORM = 4.8


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run (full or dry)."""

    gemm: tuple[int, int, int]
    step: tuple[int, int, int]
    step_batch: int
    probe: str
    imagenet: tuple[int, int, int]
    imagenet_test: int
    chunk: int
    warmup_rows: int
    max_extra_epochs: int


FULL = Sizes(
    gemm=(8192, 1024, 1000),
    step=(65536, 1024, 1000),
    step_batch=4096,
    probe="100000x512x1000",
    imagenet=(1281167, 1024, 1000),
    imagenet_test=50000,
    chunk=65536,
    warmup_rows=4096,
    max_extra_epochs=50,
)
DRY = Sizes(
    gemm=(512, 64, 32),
    step=(2000, 32, 10),
    step_batch=256,
    probe="2000x32x10",
    imagenet=(5000, 64, 10),
    imagenet_test=1000,
    chunk=1024,
    warmup_rows=400,
    max_extra_epochs=2,
)


@dataclass
class Context:
    """What every section needs: device, sizes, the LogisticRegression C."""

    device: str
    sizes: Sizes
    C: float
    dry_run: bool


# ---------------------------------------------------------------- budgets
class BudgetExceeded(Exception):
    """Raised in the main thread (SIGALRM) when the innermost deadline passes."""


_DEADLINES: list[float] = []


def _on_alarm(signum, frame):
    raise BudgetExceeded("time budget spent")


def _arm() -> None:
    if not _DEADLINES:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    signal.setitimer(signal.ITIMER_REAL, max(_DEADLINES[-1] - time.monotonic(), 1e-3))


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise :class:`BudgetExceeded` after ``seconds`` (nested deadlines: the earliest wins)."""
    outer = _DEADLINES[-1] if _DEADLINES else math.inf
    _DEADLINES.append(min(time.monotonic() + seconds, outer))
    _arm()
    try:
        yield
    finally:
        _DEADLINES.pop()
        _arm()


def time_left() -> float:
    """Seconds to the innermost deadline (inf outside any)."""
    return _DEADLINES[-1] - time.monotonic() if _DEADLINES else math.inf


# ---------------------------------------------------------------- report
@dataclass
class Table:
    """A markdown table filled row by row (rendered even when its section stops early)."""

    columns: list[str]
    rows: list[dict] = field(default_factory=list)

    def render(self) -> str:
        return _common.markdown_table(self.rows, self.columns) if self.rows else "(no rows)"


@dataclass
class Section:
    """One report section: text blocks and tables, in order."""

    title: str
    blocks: list = field(default_factory=list)
    failed: bool = False

    def say(self, text: str) -> None:
        self.blocks.append(text)
        print(text, flush=True)

    def table(self, columns: list[str]) -> Table:
        table = Table(columns)
        self.blocks.append(table)
        return table

    def render(self) -> str:
        parts = [b.render() if isinstance(b, Table) else b for b in self.blocks]
        return "\n\n".join([self.title, *parts])


@dataclass
class Report:
    """The markdown report, rewritten to ``path`` after every section."""

    path: Path
    header: str
    sections: list[Section] = field(default_factory=list)

    def text(self) -> str:
        return "\n\n".join([self.header, *(s.render() for s in self.sections)]) + "\n"

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text())


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_section(report: Report, number: int, title: str, seconds: float, body, ctx: Context) -> None:
    """Run ``body(section, ctx)`` within ``seconds``; record its exceptions instead of raising them."""
    section = Section(f"## {number}. {title}")
    report.sections.append(section)
    print(f"\n{section.title} (budget {seconds:.0f} s)", flush=True)
    start = time.perf_counter()
    try:
        with deadline(seconds):
            body(section, ctx)
    except BudgetExceeded:
        section.say(f"**budget**: the section stopped at its budget of {seconds:.0f} s.")
    except Exception as exc:  # one section's failure (CUDA OOM included) must not stop the rest
        section.failed = True
        tail = "".join(traceback.format_exception(exc)[-6:])
        section.say(f"**error**: {_short(exc)}\n\n```\n{tail.rstrip()}\n```")
    finally:
        free_memory(ctx.device)
    section.say(f"_Section time: {time.perf_counter() - start:.1f} s of a {seconds:.0f} s budget._")
    report.write()


# ---------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    """``(fn(), wall seconds, ConvergenceWarnings raised)``, synchronised on CUDA."""
    sync(device)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        out = fn()
        sync(device)
    seconds = time.perf_counter() - start
    return out, seconds, sum(issubclass(w.category, ConvergenceWarning) for w in caught)


def quiet(fn):
    """``fn()`` with warnings silenced (warm-up fits)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def verbose_epochs(text: str) -> list[tuple[int, float]]:
    """``(CG iterations, seconds)`` of each epoch line that ``FGNClassifier(verbose=1)`` printed."""
    found = re.findall(r"^Iteration \d+,.*CG iterations = (\d+).*, ([0-9.]+) s$", text, flags=re.M)
    return [(int(cg), float(s)) for cg, s in found]


def fit_verbose(est, X, y, device: str):
    """Timed ``est.fit(X, y)`` with ``verbose=1``; returns (seconds, warnings, epoch lines)."""
    buffer = io.StringIO()
    est.set_params(verbose=1)
    with contextlib.redirect_stdout(buffer):
        _, seconds, n_warn = timed(lambda: est.fit(X, y), device)
    return seconds, n_warn, verbose_epochs(buffer.getvalue())


def class_means_data(n: int, d: int, k: int, device: str, seed: int, chunk: int):
    """``(X, y)`` tensors on ``device``: y uniform on k classes, X = mu_y + N(0, I), float32, in chunks."""
    gen = torch.Generator(device=device).manual_seed(seed)
    means = torch.randn(k, d, generator=gen, device=device) * (MEAN_NORM / math.sqrt(d))
    y = torch.randint(k, (n,), generator=gen, device=device)
    X = torch.empty(n, d, device=device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        X[start:stop] = torch.randn(stop - start, d, generator=gen, device=device).add_(means[y[start:stop]])
    return X, y


def host_copy(X: torch.Tensor, chunk: int) -> np.ndarray:
    """A host numpy copy of ``X``, ``chunk`` rows at a time."""
    out = np.empty(tuple(X.shape), dtype=np.float32)
    for start in range(0, X.shape[0], chunk):
        out[start : start + chunk] = X[start : start + chunk].cpu().numpy()
    return out


# ---------------------------------------------------------------- 1. device
def section_device(section: Section, ctx: Context) -> None:
    lines = [
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
        f"scikit-learn {sklearn.__version__}, scipy {scipy.__version__}, numpy {np.__version__}, "
        f"Python {sys.version.split()[0]}",
        f"- CPU: {_common.machine_description()}",
    ]
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.insert(
            0,
            f"- GPU: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible), "
            f"{props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}, "
            f"{props.multi_processor_count} SMs",
        )
        matmul = torch.backends.cuda.matmul
        setting = f"fp32_precision = {matmul.fp32_precision!r}" if hasattr(matmul, "fp32_precision") else ""
        lines.append(
            f"- float32 matmul: torch.backends.cuda.matmul {setting or f'allow_tf32 = {matmul.allow_tf32}'}, "
            f"float32_matmul_precision = {torch.get_float32_matmul_precision()!r}"
        )
        lines.append(f"- driver: {nvidia_smi()}")
    else:
        lines.insert(0, "- device: cpu (dry run; no GPU is used)")
    section.say("\n".join(lines))


def nvidia_smi() -> str:
    """Driver version and GPU clocks from ``nvidia-smi`` (or why they are unknown)."""
    query = "--query-gpu=driver_version,clocks.max.sm,power.limit,persistence_mode"
    try:
        command = ["nvidia-smi", query, "--format=csv,noheader"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi unavailable ({_short(exc, 100)})"
    return f"{query.split('=')[1]} = {result.stdout.strip() or result.stderr.strip()}"


# ---------------------------------------------------------------- 2. tests
def section_tests(section: Section, ctx: Context) -> None:
    pytest = [sys.executable, "-m", "pytest"]
    if ctx.dry_run:
        command = [*pytest, "--collect-only", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests"]
    else:
        command = [*pytest, "-q", "-p", "no:cacheprovider", "tests", "-k", "cuda"]
    env = {k: v for k, v in os.environ.items() if k != "SCIPY_ARRAY_API"}
    shown = " ".join(["python", *command[1:]])
    try:
        result = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(time_left() - 2.0, 1.0),
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        section.say(f"`{shown}`: **stopped at the section budget**\n\n```\n{out[-2000:]}\n```")
        return
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    summary = next(
        (
            line
            for line in reversed(lines)
            if re.search(r"passed|failed|skipped|error|collected|deselected|no tests ran", line)
        ),
        "(no summary line)",
    )
    section.say(f"`{shown}` -> exit {result.returncode}: **{summary.strip('= ')}**")
    notable = [line for line in lines if re.match(r"(FAILED|ERROR|SKIPPED)", line)]
    if notable:
        section.say("```\n" + "\n".join(notable[:30]) + "\n```")
    if result.returncode not in (0, 5):  # 5: nothing selected
        section.failed = True
        section.say("```\n" + "\n".join(lines[-40:]) + "\n" + result.stderr[-2000:] + "\n```")


# ---------------------------------------------------------------- 3. throughput
@contextlib.contextmanager
def tf32_matmul(enabled: bool):
    """Allow or forbid TF32 in float32 CUDA matmuls, restoring the setting after.

    Uses ``fp32_precision`` where torch has it (mixing it with the legacy ``allow_tf32`` raises).
    """
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    saved = matmul.fp32_precision if new_api else matmul.allow_tf32
    if new_api:
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        setattr(matmul, "fp32_precision" if new_api else "allow_tf32", saved)


def matmul_seconds(n: int, d: int, k: int, device: str, tf32: bool) -> float:
    """Best-of-5 seconds of one (n, d) @ (d, k) float32 product (20 back-to-back per run)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, d, generator=gen, device=device)
    b = torch.randn(d, k, generator=gen, device=device)
    c = torch.empty(n, k, device=device)
    with tf32_matmul(tf32):
        for _ in range(3):
            torch.matmul(a, b, out=c)
        runs = []
        for _ in range(5):
            _, seconds, _ = timed(lambda: [torch.matmul(a, b, out=c) for _ in range(20)], device)
            runs.append(seconds / 20)
    return min(runs)


def fgn_epoch(ctx: Context):
    """One timed epoch of the public estimator; returns (fit seconds, epoch lines, steps)."""
    (n, d, k), batch = ctx.sizes.step, ctx.sizes.step_batch
    X_t, y_t = class_means_data(n, d, k, ctx.device, seed=1, chunk=ctx.sizes.chunk)
    X, y = host_copy(X_t, ctx.sizes.chunk), y_t.cpu().numpy()
    del X_t, y_t

    def make():
        return FGNClassifier(
            device=ctx.device, batch_size=batch, max_iter=1, early_stopping=False, random_state=0
        )

    quiet(lambda: make().fit(X[: 2 * batch], y[: 2 * batch]))  # warm-up: same kernels, two steps
    seconds, _, epochs = fit_verbose(make(), X, y, ctx.device)
    return seconds, epochs, math.ceil(n / batch)


def section_throughput(section: Section, ctx: Context) -> None:
    n, d, k = ctx.sizes.gemm
    flops = 2.0 * n * d * k
    table = section.table(
        ["measurement", "seconds", "TFLOP/s", "share of FP32 matmul", "share of TF32 matmul", "note"]
    )
    rates = {}
    for tf32 in (True, False):
        seconds = matmul_seconds(n, d, k, ctx.device, tf32)
        rates[tf32] = flops / seconds / 1e12
        table.rows.append(
            {
                "measurement": f"matmul ({n}, {d}) @ ({d}, {k}) float32, TF32 {'on' if tf32 else 'off'}",
                "seconds": seconds,
                "TFLOP/s": rates[tf32],
                "note": f"{flops / 1e9:.1f} GFLOP",
            }
        )
    fit_seconds, epochs, steps = fgn_epoch(ctx)
    (n, d, k), batch = ctx.sizes.step, ctx.sizes.step_batch
    if not epochs:
        section.say(
            "The estimator printed no epoch line: the fit time (setup included) stands for the epoch "
            "and CG iterations are not counted (a lower bound on the rate)."
        )
    cg, epoch_seconds = epochs[0] if epochs else (0, fit_seconds)
    rows_per_step = n / steps
    model = 4.0 * n * d * k + cg * 4.0 * rows_per_step * d * k  # gradient + CG iterations
    whitened = model + 2.0 * n * d * d
    for label, total in (("gradient + CG", model), ("gradient + CG + per-batch whitening", whitened)):
        rate = total / epoch_seconds / 1e12
        table.rows.append(
            {
                "measurement": f"FGN epoch, {steps} steps of {batch} rows ({label})",
                "seconds": epoch_seconds / steps,
                "TFLOP/s": rate,
                "share of FP32 matmul": rate / rates[False],
                "share of TF32 matmul": rate / rates[True],
                "note": f"per step; {cg} CG iterations in the epoch, {total / 1e9:.1f} GFLOP",
            }
        )
    section.say(
        f"FGN problem: {n} x {d} x {k} float32 class means; `FGNClassifier(device={ctx.device!r}, "
        f"batch_size={batch}, max_iter=1, early_stopping=False)`: whole fit {fit_seconds:.3f} s "
        f"(input checks, copy to the device, feature metric and the epoch), epoch {epoch_seconds:.3f} s. "
        "Flop model per step of b rows: gradient 4 b d K, each CG iteration 4 b d K (JVP + VJP), "
        "whitening 2 b d^2; not counted: the trial losses of the adaptive damping, the step updates, "
        'and the b^2 (d + K) + b^3/3 of a Gram-Cholesky step if `solver="auto"` takes one.'
    )


# ---------------------------------------------------------------- 4. linear probes
class Unsupported(Exception):
    """A method the installed libraries cannot run here (reported, not an error)."""


def fgn_probe(data, ctx: Context):
    X_tr, X_te, y_tr, _ = data
    warm = ctx.sizes.warmup_rows
    quiet(
        lambda: FGNClassifier(device=ctx.device, batch_size=512, max_iter=1, early_stopping=False).fit(
            X_tr[:warm], y_tr[:warm]
        )
    )
    est = FGNClassifier(device=ctx.device, random_state=0)
    _, seconds, n_warn = timed(lambda: est.fit(X_tr, y_tr), ctx.device)
    return est.predict(X_te), seconds, f"n_iter_={est.n_iter_}" + (", ConvergenceWarning" if n_warn else "")


def torch_lbfgs(X: torch.Tensor, y: torch.Tensor, n_classes: int, alpha: float, max_iter: int):
    """Full-batch ``torch.optim.LBFGS`` on ``nn.Linear`` (from zero) + L2; returns (layer, evaluations)."""
    layer = torch.nn.Linear(X.shape[1], n_classes, device=X.device, dtype=X.dtype)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    opt = torch.optim.LBFGS(
        layer.parameters(), lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe"
    )
    evaluations = [0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(X), y) + 0.5 * alpha * layer.weight.pow(2).sum()
        loss.backward()
        evaluations[0] += 1
        return loss

    opt.step(closure)
    return layer, evaluations[0]


def torch_lbfgs_probe(data, ctx: Context):
    X_tr, X_te, y_tr, _ = data
    classes, y_enc = np.unique(y_tr, return_inverse=True)
    X = torch.as_tensor(X_tr, device=ctx.device)
    y = torch.as_tensor(y_enc, device=ctx.device)
    alpha = 1.0 / (ctx.C * len(y_tr))
    warm = ctx.sizes.warmup_rows
    torch_lbfgs(X[:warm], y[:warm], len(classes), alpha, max_iter=5)
    (layer, evaluations), seconds, _ = timed(lambda: torch_lbfgs(X, y, len(classes), alpha, 500), ctx.device)
    with torch.no_grad():
        pred = layer(torch.as_tensor(X_te, device=ctx.device)).argmax(1).cpu().numpy()
    return classes[pred], seconds, f"{evaluations} closure evaluations"


def array_api_probe(data, ctx: Context):
    tags = LogisticRegression().__sklearn_tags__()
    if not getattr(tags, "array_api_support", False):
        raise Unsupported(f"not supported by scikit-learn {sklearn.__version__}")
    X_tr, X_te, y_tr, _ = data
    X, y = torch.as_tensor(X_tr, device=ctx.device), torch.as_tensor(y_tr, device=ctx.device)
    warm = ctx.sizes.warmup_rows
    with sklearn.config_context(array_api_dispatch=True):
        quiet(lambda: LogisticRegression(C=ctx.C, max_iter=5).fit(X[:warm], y[:warm]))
        est, seconds, n_warn = timed(lambda: LogisticRegression(C=ctx.C, max_iter=1000).fit(X, y), ctx.device)
        pred = est.predict(torch.as_tensor(X_te, device=ctx.device))
    note = f"{int(est.n_iter_[0])} it" + (", ConvergenceWarning" if n_warn else "")
    return np.asarray(pred.cpu()), seconds, note


def cpu_lr_probe(data, ctx: Context):
    X_tr, X_te, y_tr, _ = data
    est, seconds, n_warn = timed(lambda: LogisticRegression(C=ctx.C, max_iter=1000).fit(X_tr, y_tr), "cpu")
    note = f"{int(est.n_iter_[0])} it" + (", ConvergenceWarning" if n_warn else "")
    return est.predict(X_te), seconds, note


CPU_LR = "LogisticRegression(lbfgs), CPU"


def probe_methods(ctx: Context):
    """(method, where, fit_predict, budget weight), in run order; the CPU reference runs last."""
    return [
        ("FGNClassifier() [defaults]", ctx.device, fgn_probe, 3.0),
        ("torch.optim.LBFGS (full batch, alpha=1/(C n))", ctx.device, torch_lbfgs_probe, 1.5),
        ("LogisticRegression(lbfgs), array API", f"{ctx.device} (torch)", array_api_probe, 1.5),
        (CPU_LR, f"cpu ({_common.THREADS} threads)", cpu_lr_probe, 4.0),
    ]


def run_method(row: dict, fit_predict, data, ctx: Context, budget: float, section: Section) -> None:
    """Fill ``row`` with the test accuracy and seconds of one fit run within ``budget``."""
    if budget < MIN_FIT_SECONDS:
        row.update({"test acc (%)": "—", "seconds": "—", "note": "skipped: the section budget is spent"})
        return
    try:
        with deadline(budget):
            pred, seconds, note = fit_predict(data, ctx)
        row.update(
            {"test acc (%)": 100.0 * float(np.mean(pred == data[3])), "seconds": seconds, "note": note}
        )
    except BudgetExceeded:
        row.update({"test acc (%)": "—", "seconds": f">{budget:.1f}", "note": "stopped at its budget"})
    except Unsupported as exc:
        row.update({"test acc (%)": "—", "seconds": "—", "note": str(exc)})
    except Exception as exc:  # one method's failure must not stop the others
        section.failed = True
        row.update({"test acc (%)": "—", "seconds": "—", "note": f"error: {_short(exc, 200)}"})
        free_memory(ctx.device)
    print(f"  {row['method']}: acc {row['test acc (%)']}, {row['seconds']} s, {row['note']}", flush=True)


def add_ratios(rows: list[dict]) -> None:
    """Time and accuracy against the CPU LogisticRegression row (bounds when it hit its budget)."""
    ref = next((r for r in rows if r["method"] == CPU_LR), None)
    if ref is None:
        return
    for row in rows:
        if not isinstance(row["seconds"], float):
            continue
        if isinstance(ref["seconds"], float):
            row["time / LR CPU"] = row["seconds"] / ref["seconds"]
        elif str(ref["seconds"]).startswith(">"):
            row["time / LR CPU"] = f"<{row['seconds'] / float(ref['seconds'][1:]):.3g}"
        if isinstance(ref["test acc (%)"], float):
            row["acc - LR CPU (pt)"] = row["test acc (%)"] - ref["test acc (%)"]


def run_problem(table: Table, name: str, kwargs: dict, label: str, ctx: Context, section: Section) -> None:
    """Load one problem and run every method on it within the current deadline."""
    data = load_problem(name, dtype="float32", **kwargs)
    methods = probe_methods(ctx)
    weight_left = sum(m[3] for m in methods)
    rows = []
    for method, where, fit_predict, weight in methods:
        rows.append({"problem": f"{name} ({label})", "method": method, "device": where})
        table.rows.append(rows[-1])
        run_method(rows[-1], fit_predict, data, ctx, time_left() * weight / weight_left, section)
        weight_left -= weight
    add_ratios(rows)


def section_probe(section: Section, ctx: Context) -> None:
    problems = [
        (ctx.sizes.probe, {"class_sep": 3.0}, "isotropic, standardised"),
        (f"emb:{ctx.sizes.probe}:2", {}, "embedding-like, raw"),
    ]
    section.say(
        f'Problems: `load_problem(name, dtype="float32")` from benchmarks/_data.py, C = {ctx.C:g} '
        f"(alpha = 1/(C n) for torch LBFGS). Time ratios below 1: faster than the CPU fit."
    )
    table = section.table(
        [
            "problem",
            "method",
            "device",
            "test acc (%)",
            "seconds",
            "time / LR CPU",
            "acc - LR CPU (pt)",
            "note",
        ]
    )
    for index, (name, kwargs, label) in enumerate(problems):
        try:
            with deadline(time_left() / (len(problems) - index)):
                run_problem(table, name, kwargs, label, ctx, section)
        except BudgetExceeded:
            section.say(f"**budget**: {name} stopped at its share of the section budget.")
        free_memory(ctx.device)


# ---------------------------------------------------------------- 5. ImageNet-sized probe
def fit_device_input(est, X: torch.Tensor, y: torch.Tensor, device: str):
    """One epoch on device tensors: ``((y given, how, seconds, epoch lines) or None, refusals)``."""
    refusals = []
    for label, y_given in (
        (f"{device} tensors X and y", y),
        (f"{device} tensor X, numpy y", y.cpu().numpy()),
    ):
        try:
            seconds, _, epochs = fit_verbose(est, X, y_given, device)
            return (y_given, f"{label} accepted", seconds, epochs), refusals
        except (TypeError, ValueError) as exc:
            refusals.append(f"{label} refused ({_short(exc, 160)})")
    return None, refusals


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def section_imagenet(section: Section, ctx: Context) -> None:
    (n, d, k), m, chunk = ctx.sizes.imagenet, ctx.sizes.imagenet_test, ctx.sizes.chunk
    X_all, y_all = class_means_data(n + m, d, k, ctx.device, seed=2, chunk=chunk)
    X_te, y_te = host_copy(X_all[n:], chunk), y_all[n:].cpu().numpy()
    X, y = X_all[:n], y_all[:n]
    del X_all, y_all
    section.say(
        f"Data: {n} x {d} float32 ({n * d * 4 / 2**30:.2f} GiB), {k} classes, generated on {ctx.device} "
        f"in chunks of {chunk} rows; {m} held-out test rows."
    )
    reset_peak(ctx.device)
    est = FGNClassifier(device=ctx.device, random_state=0, max_iter=1, warm_start=True)
    fitted, refusals = fit_device_input(est, X, y, ctx.device)
    if fitted is None:
        X, y = host_copy(X, chunk), y.cpu().numpy()  # rebinding frees the device copy
        free_memory(ctx.device)
        reset_peak(ctx.device)
        seconds, _, epochs = fit_verbose(est, X, y, ctx.device)
        how = "; ".join(refusals) + f"; fell back to a host numpy array built in chunks of {chunk} rows"
    else:
        y, how, seconds, epochs = fitted
    section.say(f"Input: {how}.")
    more = _extra_epochs(seconds, epochs, ctx)
    if more:
        est.set_params(max_iter=more)
        extra_seconds, _, extra_epochs = fit_verbose(est, X, y, ctx.device)
        seconds, epochs = seconds + extra_seconds, epochs + extra_epochs
    table = section.table(["method", "seconds", "epochs", "peak GPU memory (GiB)", "test acc (%)", "note"])
    table.rows.append(imagenet_row(est, seconds, epochs, more, X_te, y_te, ctx.device))
    if ctx.dry_run:  # the GPU run may take either input path: run the host-copy one here too
        table.rows.append(host_path_row(X, y, X_te, y_te, ctx))


def imagenet_row(est, seconds: float, epochs, more: int, X_te, y_te, device: str) -> dict:
    return {
        "method": "FGNClassifier(random_state=0) [defaults, max_iter limited]",
        "seconds": seconds,
        "epochs": len(epochs) or est.n_iter_,
        "peak GPU memory (GiB)": torch.cuda.max_memory_allocated() / 2**30
        if device == "cuda"
        else "n/a (cpu)",
        "test acc (%)": 100.0 * float(np.mean(est.predict(X_te) == y_te)),
        "note": f"one epoch, then up to {more} more (warm_start); {sum(c for c, _ in epochs)} CG iterations",
    }


def host_path_row(X, y, X_te, y_te, ctx: Context) -> dict:
    """Dry run: one epoch from a host copy built in chunks (the fallback input path)."""
    X_host = X if isinstance(X, np.ndarray) else host_copy(X, ctx.sizes.chunk)
    y_host = y if isinstance(y, np.ndarray) else y.cpu().numpy()
    est = FGNClassifier(device=ctx.device, random_state=0, max_iter=1)
    seconds, _, _ = fit_verbose(est, X_host, y_host, ctx.device)
    acc = 100.0 * float(np.mean(est.predict(X_te) == y_te))
    return {
        "method": "dry run: the host-copy input path, one epoch",
        "seconds": seconds,
        "epochs": 1,
        "peak GPU memory (GiB)": "n/a (cpu)",
        "test acc (%)": acc,
    }


def _extra_epochs(first_seconds: float, epochs, ctx: Context) -> int:
    """Further epochs that fit in what is left of the section (keeping 10 % and 5 s for predict)."""
    epoch = epochs[0][1] if epochs else first_seconds
    setup = max(first_seconds - epoch, 0.0)
    room = time_left() - max(5.0, 0.1 * time_left()) - setup
    return int(min(max(room // max(epoch, 1e-3), 0), ctx.sizes.max_extra_epochs))


# ---------------------------------------------------------------- main
SECTIONS = (
    ("device", "Device", section_device),
    ("tests", "CUDA tests", section_tests),
    ("throughput", "Matmul and FGN step throughput", section_throughput),
    ("probe", "Linear probes against LogisticRegression", section_probe),
    ("imagenet", "ImageNet-sized probe", section_imagenet),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes: check every code path")
    parser.add_argument(
        "--install", action="store_true", help='pip install -e ".[test]" array-api-compat first'
    )
    parser.add_argument(
        "--budget-seconds", type=float, default=420.0, help="total budget split over sections"
    )
    parser.add_argument(
        "--C", type=float, default=1.0, help="LogisticRegression C (torch LBFGS: alpha=1/(C n))"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report path (markdown)")
    parser.add_argument(
        "--sections", nargs="+", choices=list(SHARES), default=list(SHARES),
        help="sections to run (default: all); the budget is split over them in proportion to their shares",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("CUDA is not available: run with --dry-run on a CPU-only machine.", file=sys.stderr)
        return 2
    ctx = Context("cpu" if args.dry_run else "cuda", DRY if args.dry_run else FULL, args.C, args.dry_run)
    header = (
        f"# GPU check{' (dry run: CPU, tiny sizes)' if args.dry_run else ''}\n\n"
        f"`python benchmarks/gpu_check.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
        f"budget {args.budget_seconds:.0f} s; started {time.strftime('%Y-%m-%d %H:%M:%S')}."
    )
    report = Report(args.out, header)
    signal.signal(signal.SIGALRM, _on_alarm)
    total_share = sum(SHARES[key] for key in args.sections)
    for number, (key, title, body) in enumerate(SECTIONS, 1):
        if key in args.sections:
            run_section(report, number, title, SHARES[key] / total_share * args.budget_seconds, body, ctx)
    print("\n" + report.text())
    print(f"wrote {args.out}")
    return 1 if any(s.failed for s in report.sections) else 0


if __name__ == "__main__":
    sys.exit(main())
