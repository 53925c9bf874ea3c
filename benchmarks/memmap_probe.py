"""Peak memory of a mini-batch fit on a read-only ``np.memmap`` against the same array in memory.

Writes an embedding-like problem (``_data.make_embeddings``, float32) to a
file, then, in a fresh child process per input kind, fits
``FGNClassifier(batch_size=512, max_iter=1, early_stopping="auto")`` on it
once (one epoch, the validation split included) and samples the process's
anonymous resident memory (``RssAnon`` of ``/proc/self/status``, every 20 ms):
the pages of a memory-mapped file are the page cache's, which the kernel
reclaims, and are not counted. Reported: the peak anonymous memory over the
child's baseline after loading, against the size of X.

Run::

    python benchmarks/memmap_probe.py --rows 400000 --features 512 --classes 100
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
CHILD = r"""
import sys, threading, time, warnings
import numpy as np
sys.path.insert(0, {bench!r})
import _common  # noqa: F401
from sklearn_fgn import FGNClassifier

def anon_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

path, n, d, kind = {path!r}, {n}, {d}, {kind!r}
X = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d))
y = np.load(path + ".y.npy")
if kind == "array":
    X = np.array(X)
base, peak, done = anon_kib(), [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.02)
thread = threading.Thread(target=sample)
thread.start()
start = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    FGNClassifier(batch_size=512, max_iter=1, device="cpu", random_state=0).fit(X, y)
seconds = time.perf_counter() - start
done[0] = True
thread.join()
print(f"{{(peak[0] - base) / 1024:.1f}} {{seconds:.1f}}")
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400000)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args(argv)
    sys.path.insert(0, BENCH_DIR)
    import numpy as np
    from _data import make_embeddings

    n, d = args.rows, args.features
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "X.f32")
        X, y = make_embeddings(n, d, args.classes, seed=0)
        np.asarray(X, dtype=np.float32).tofile(path)
        np.save(path + ".y.npy", y)
        del X
        size_mib = n * d * 4 / 2**20
        print(f"X: {n} x {d} float32 = {size_mib:.0f} MiB, {args.classes} classes; one epoch of batch 512")
        print("| input | peak anonymous memory over baseline (MiB) | share of X | seconds |")
        print("|---|---|---|---|")
        for kind in ("memmap", "array"):
            code = CHILD.format(bench=BENCH_DIR, path=path, n=n, d=d, kind=kind)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            peak, seconds = (float(v) for v in out.stdout.split())
            print(f"| {kind} | {peak:.0f} | {peak / size_mib:.2f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
