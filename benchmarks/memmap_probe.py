"""Peak memory of a mini-batch fit and a prediction on a read-only ``np.memmap``, under a memory limit or not.

Writes an embedding-like problem (the distribution of ``_data.make_embeddings``,
float32) to a file in row chunks (X is never held whole in memory), plus a
held-out test set of ``--test-rows`` rows drawn the same way. Then, in a fresh
child process per input kind, it fits
``FGNClassifier(batch_size=512, max_iter=1, early_stopping="auto")`` once (one
epoch, the validation split included), predicts the labels of the whole file
(``predict`` works through it in chunks) and of the test set, and samples the
process's anonymous resident memory (``RssAnon`` of ``/proc/self/status``) and
its resident memory (``VmRSS``, which also counts the memmap's file pages)
every 20 ms. The pages of a memory-mapped file are the page cache's, which the
kernel reclaims; anonymous memory is what a pass that copies X would grow.
Reported per phase: the peak over the child's baseline after loading y and
the test set, wall and CPU seconds, major page faults and bytes read from disk.

The file's pages are dropped from the page cache (``fsync`` then
``posix_fadvise(DONTNEED)``) before each child starts: every run starts cold.

``--memory-limit-gib G`` runs the child in a memory limit of G GiB (anonymous
memory and page cache together), so that the file can be several times the
memory the child may use: a cgroup v1 memory cgroup created under this
process's own (``/proc/self/cgroup``), the child joining it by
``sh -c 'echo $$ > cgroup.procs; exec python ...'``; failing that,
``systemd-run --scope -p MemoryMax=G``. The cgroup's ``memory.max_usage_in_bytes``
(page cache included) is reported per phase. Without a working mechanism the
run goes on unlimited and says so. With a limit only the memmap is run by
default (X in memory does not fit).

Run::

    python benchmarks/memmap_probe.py --rows 400000 --features 512 --classes 100
    python benchmarks/memmap_probe.py --rows 1281167 --features 1024 --classes 1000 --memory-limit-gib 1.5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
CHILD = r"""
import json, mmap, os, resource, sys, threading, time, warnings
import numpy as np
sys.path.insert(0, {bench!r})
import _common  # noqa: F401
from sklearn_fgn import FGNClassifier

cgroup, madvise = {cgroup!r}, {madvise!r}

def status_kib():
    out = {{}}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out

def read_bytes():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))

def cgroup_value(name):
    with open(os.path.join(cgroup, name)) as f:
        return int(f.read())

path, n, d, kind = {path!r}, {n}, {d}, {kind!r}
X = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d))
y = np.load(path + ".y.npy")
X_test, y_test = np.load(path + ".Xtest.npy"), np.load(path + ".ytest.npy")
if kind == "array":
    X = np.array(X)
elif madvise == "random":  # no read-around on the fit's random row gathers; predict reads in order
    X._mmap.madvise(mmap.MADV_RANDOM)
base = status_kib()
report = {{"base_anon_mib": base["RssAnon"] / 1024, "base_rss_mib": base["VmRSS"] / 1024}}

def phase(name, work):
    if cgroup:
        with open(os.path.join(cgroup, "memory.max_usage_in_bytes"), "w") as f:
            f.write("0")  # cgroup v1: resets the peak to the present usage
    peak, done = {{"RssAnon": 0, "VmRSS": 0}}, [False]
    def sample():
        while not done[0]:
            now = status_kib()
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.02)
    thread = threading.Thread(target=sample)
    start_anon = status_kib()["RssAnon"]
    faults, disk, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, read_bytes(), time.process_time()
    thread.start()
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    done[0] = True
    thread.join()
    row = {{
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,
        "anon_at_start_over_base_mib": (start_anon - base["RssAnon"]) / 1024,
        "peak_anon_over_base_mib": (peak["RssAnon"] - base["RssAnon"]) / 1024,
        "peak_rss_mib": peak["VmRSS"] / 1024,
        "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults,
        "read_gib": (read_bytes() - disk) / 2**30,
    }}
    if cgroup:
        row["cgroup_peak_mib"] = cgroup_value("memory.max_usage_in_bytes") / 2**20
        row["cgroup_failcnt"] = cgroup_value("memory.failcnt")
    report[name] = row
    print(json.dumps({{name: row}}), file=sys.stderr, flush=True)  # progress
    return result

def fit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FGNClassifier(batch_size=512, max_iter=1, device="cpu", random_state=0).fit(X, y)

model = phase("fit", fit)
if kind == "memmap" and madvise == "random":
    X._mmap.madvise(mmap.MADV_NORMAL)
train_pred = phase("predict", lambda: model.predict(X))
report["train_accuracy"] = float(np.mean(train_pred == y))
report["test_accuracy"] = float(model.score(X_test, y_test))
report["peak_rss_hwm_mib"] = status_kib()["VmHWM"] / 1024
print(json.dumps(report))
"""


def _block(rng, m, d, n_classes, means, root, basis_t):
    """``m`` rows of ``make_embeddings``'s distribution (float32) and their labels."""
    y = rng.integers(0, n_classes, size=m)
    X = ((means[y] + rng.standard_normal((m, d)) * root).astype(np.float32)) @ basis_t
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, y


def write_embeddings(path, n, d, n_classes, n_test, seed=0, chunk_rows=32768, exponent=2.0):
    """Write X (float32, raw rows) to ``path`` in chunks, y to ``path.y.npy``, a test set beside them.

    Same distribution as ``_data.make_embeddings`` (its basis and class means,
    from the same seed), the rows drawn chunk by chunk from their own streams.
    """
    from _data import EMBEDDING_CLASS_SEP

    rng = np.random.default_rng(seed)
    j = np.arange(1, d + 1, dtype=np.float64)
    root = j ** (-exponent / 2)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    means = rng.standard_normal((n_classes, d)) * j ** (-(exponent + 1) / 2) * EMBEDDING_CLASS_SEP
    basis_t = np.ascontiguousarray(basis.T, dtype=np.float32)
    ys = []
    with open(path, "wb") as f:
        for i, start in enumerate(range(0, n, chunk_rows)):
            X, y = _block(np.random.default_rng([seed, i + 1]), min(chunk_rows, n - start), d, n_classes,
                          means, root, basis_t)  # fmt: skip
            X.tofile(f)
            ys.append(y)
        f.flush()
        os.fsync(f.fileno())
    np.save(path + ".y.npy", np.concatenate(ys))
    X_test, y_test = _block(np.random.default_rng([seed, 0]), n_test, d, n_classes, means, root, basis_t)
    np.save(path + ".Xtest.npy", X_test)
    np.save(path + ".ytest.npy", y_test)


def drop_page_cache(path):
    """Evict ``path``'s (clean) pages from the page cache, so that the next reader starts cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_mib(path):
    """MiB of ``path`` in the page cache (``fincore``), or None."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True)  # fmt: skip
    try:
        return int(out.stdout.split()[0]) / 2**20
    except (IndexError, ValueError):
        return None


def _memory_cgroup_dir():
    """This process's cgroup v1 memory directory, or None."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, rel = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                path = "/sys/fs/cgroup/memory" + rel
                return path if os.path.isdir(path) else None
    return None


class MemoryLimit:
    """Runs a command under ``limit_bytes``: a cgroup v1 child, else ``systemd-run --scope``, else none."""

    def __init__(self, limit_bytes):
        self.limit_bytes, self.cgroup, self.mechanism, self.failures = limit_bytes, None, None, []
        if limit_bytes is None:
            return
        parent = _memory_cgroup_dir()
        if parent is None:
            self.failures.append("no cgroup v1 memory controller for this process")
        else:
            path = os.path.join(parent, f"memmap_probe_{os.getpid()}")
            try:
                os.mkdir(path)
                with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
                    f.write(str(limit_bytes))
                with open(os.path.join(path, "memory.limit_in_bytes")) as f:
                    if int(f.read()) > limit_bytes:
                        raise OSError("the limit did not take")
                self.cgroup, self.mechanism = path, f"cgroup v1 {path}"
                return
            except OSError as error:
                self.failures.append(f"cgroup v1 child of {parent}: {error}")
                self._remove(path)
        if shutil.which("systemd-run"):
            command = ["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={limit_bytes}", "true"]
            probe = subprocess.run(command, capture_output=True, text=True)
            if probe.returncode == 0:
                self.mechanism = f"systemd-run --scope -p MemoryMax={limit_bytes}"
                return
            self.failures.append(f"systemd-run: {probe.stderr.strip()}")
        else:
            self.failures.append("systemd-run not found")

    def wrap(self, command):
        if self.cgroup is not None:
            procs = os.path.join(self.cgroup, "cgroup.procs")
            return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *command]
        if self.mechanism is not None:
            return ["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={self.limit_bytes}", *command]
        return command

    def oom_kills(self):
        if self.cgroup is None:
            return None
        with open(os.path.join(self.cgroup, "memory.oom_control")) as f:
            return next((int(line.split()[1]) for line in f if line.startswith("oom_kill ")), None)

    @staticmethod
    def _remove(path):
        for _ in range(50):  # the cgroup empties once the child has exited
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)

    def close(self):
        if self.cgroup is not None:
            self._remove(self.cgroup)
            self.cgroup = None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400000)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--test-rows", type=int, default=10000)
    parser.add_argument("--memory-limit-gib", type=float, default=None)
    parser.add_argument("--inputs", nargs="+", choices=("memmap", "array"), default=None,
                        help="default: memmap and array, memmap alone under a memory limit")  # fmt: skip
    parser.add_argument("--madvise", choices=("none", "random"), default="none",
                        help="random: madvise(MADV_RANDOM) on the memmap for the fit")  # fmt: skip
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the data file is written")
    args = parser.parse_args(argv)
    inputs = args.inputs or (["memmap"] if args.memory_limit_gib else ["memmap", "array"])
    sys.path.insert(0, BENCH_DIR)

    n, d = args.rows, args.features
    size_mib = n * d * 4 / 2**20
    disk = shutil.disk_usage(args.dir)
    if disk.free < 1.2 * n * d * 4:
        sys.exit(f"{args.dir}: {disk.free / 2**30:.1f} GiB free, X needs {n * d * 4 / 2**30:.1f} GiB")
    limit = MemoryLimit(None if args.memory_limit_gib is None else int(args.memory_limit_gib * 2**30))
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            path = os.path.join(tmp, "X.f32")
            start = time.perf_counter()
            write_embeddings(path, n, d, args.classes, args.test_rows)
            print(f"X: {n} x {d} float32 = {size_mib:.0f} MiB in {path} (written in "
                  f"{time.perf_counter() - start:.0f} s), {args.classes} classes, "
                  f"test set {args.test_rows} rows; "
                  f"one epoch of batch 512, then predict on all of X; madvise during the fit: {args.madvise}",
                  flush=True)  # fmt: skip
            if args.memory_limit_gib is not None:
                if limit.mechanism is None:
                    print(f"NO MEMORY LIMIT: every mechanism failed ({'; '.join(limit.failures)}); "
                          "the figures below are unlimited", flush=True)  # fmt: skip
                else:
                    print(
                        f"memory limit {args.memory_limit_gib} GiB by {limit.mechanism}: "
                        f"X is {size_mib / 1024 / args.memory_limit_gib:.2f}x the limit",
                        flush=True,
                    )
            reports = {}
            for kind in inputs:
                drop_page_cache(path)
                cached = cached_mib(path)
                code = CHILD.format(bench=BENCH_DIR, path=path, n=n, d=d, kind=kind, cgroup=limit.cgroup,
                                   madvise=args.madvise)  # fmt: skip
                command = limit.wrap([sys.executable, "-c", code])
                out = subprocess.run(command, stdout=subprocess.PIPE, text=True)
                if out.returncode != 0:
                    print(f"{kind}: child exited with {out.returncode} (OOM kills in the cgroup: "
                          f"{limit.oom_kills()})", flush=True)  # fmt: skip
                    continue
                report = json.loads(out.stdout.strip().splitlines()[-1])
                report["cached_mib_at_start"] = cached
                reports[kind] = report
                print(json.dumps({kind: report}), flush=True)
            _print_tables(reports, size_mib, limit)
    finally:
        limit.close()


def _print_tables(reports, size_mib, limit):
    cg = limit.cgroup is not None
    print("\n| input | phase | anonymous memory over baseline at the start (MiB) "
          "| peak anonymous memory over baseline (MiB) | share of X | peak RSS (MiB) |"
          + (" cgroup peak (MiB) |" if cg else "")
          + " seconds (wall / CPU) | major faults | read from disk (GiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|" + ("---|" if cg else "") + "---|---|---|")
    for kind, report in reports.items():
        for name in ("fit", "predict"):
            row = report[name]
            print(f"| {kind} | {name} | {row['anon_at_start_over_base_mib']:.0f} | "
                  f"{row['peak_anon_over_base_mib']:.0f} | "
                  f"{row['peak_anon_over_base_mib'] / size_mib:.3f} | {row['peak_rss_mib']:.0f} | "
                  + (f"{row['cgroup_peak_mib']:.0f} | " if cg else "")
                  + f"{row['seconds']:.1f} / {row['cpu_seconds']:.1f} | {row['major_faults']} | "
                  f"{row['read_gib']:.2f} |")  # fmt: skip
        print(
            f"{kind}: baseline anonymous {report['base_anon_mib']:.0f} MiB, baseline RSS "
            f"{report['base_rss_mib']:.0f} MiB, VmHWM {report['peak_rss_hwm_mib']:.0f} MiB; "
            f"train accuracy {report['train_accuracy']:.4f}, test accuracy {report['test_accuracy']:.4f}"
        )


if __name__ == "__main__":
    main()
