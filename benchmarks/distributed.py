"""Data-parallel fits on gloo: compute and communication per step for 1-3 processes, and a scaling model.

Part 1 (measured): an embedding-like probe (L2-normalised rows, power-law
spectrum, fed raw; float32) is written to a ``.npy`` file; for ``world`` in
1, 2, 3 that many local processes join a gloo group, each memory-maps its
contiguous shard of rows and runs ``FGNClassifier(distributed=True)`` on it:
a full-batch fit to convergence and one mini-batch epoch. Per rank the
script reports the fit's wall and CPU seconds (one thread per process: the
CPU seconds are the rank's compute, whatever else shares the cores), the
wall seconds spent inside collectives (waiting for the slowest rank
included), the number of
all-reduces by size (parameter-sized, Kronecker factor, scalars, once-per-fit)
and the values sent per step and per CG iteration. Each process runs one
thread; with 3 processes on this 2-core machine two share a core.
The coefficients of every world size are compared with the 1-process fit.

Part 2 (model): the full-batch fit of the ImageNet-sized probe
(1281167 x 1024 x 1000 float32) on N GPUs, from the single-H200 fit measured
by ``gpu_check.py`` (RESULTS.md: 50.5 s, 21 steps, 369 CG iterations), the
all-reduce sizes counted in part 1 and a ring all-reduce at a stated bus
bandwidth and latency (NVLink, 100 Gb/s Ethernet). See ``scaling_model``.

Run::

    python benchmarks/distributed.py --rows 60000 --features 256 --classes 100
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import _common  # noqa: F401  (first: thread settings)
import numpy as np
from _data import make_embeddings

FITS = {
    "full batch": {"batch_size": None},
    "mini-batch, 1 epoch": {"batch_size": 2048, "max_iter": 1, "early_stopping": False},
}


# ------------------------------------------------------------------ worker
def _instrument():
    """Count steps and CG iterations, and the all-reduces by size; return the counters."""
    import sklearn_fgn._distributed as distributed
    import sklearn_fgn._stepper as stepper

    counts = {"steps": 0, "cg": 0, "sizes": []}
    compute_step, sum_ = stepper.compute_step, distributed.ProcessGroupCommunicator.sum_

    def counted_step(*args, **kwargs):
        result = compute_step(*args, **kwargs)
        counts["steps"] += 1
        counts["cg"] += result.solve.n_iter
        return result

    def counted_sum(self, tensor):
        counts["sizes"].append(tensor.numel())
        return sum_(self, tensor)

    stepper.compute_step = counted_step
    distributed.ProcessGroupCommunicator.sum_ = counted_sum
    return counts


def _classify(sizes, n_params, n_classes):
    kinds = {"parameter-sized": 0, "class factor": 0, "scalars": 0, "other": 0}
    for size in sizes:
        if size in (n_params, n_params + 1):
            kinds["parameter-sized"] += 1
        elif size == n_classes * n_classes:
            kinds["class factor"] += 1
        elif size <= 2:
            kinds["scalars"] += 1
        else:
            kinds["other"] += 1
    return kinds


def worker(spec_json: str, rank: str) -> None:
    import torch
    import torch.distributed as dist

    spec, rank = json.loads(spec_json), int(rank)
    world = spec["world"]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )  # fmt: skip
    from sklearn_fgn import FGNClassifier
    from sklearn_fgn._distributed import communicator

    X = np.load(spec["X"], mmap_mode="r")
    y = np.load(spec["y"])
    bounds = np.linspace(0, X.shape[0], world + 1).astype(int)
    rows = slice(bounds[rank], bounds[rank + 1])
    X_local, y_local = X[rows], y[rows]
    comm, counts = communicator(True), _instrument()
    out = {}
    for name, params in FITS.items():
        comm.stats.reset()
        counts.update(steps=0, cg=0, sizes=[])
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = FGNClassifier(distributed=True, device="cpu", random_state=0, **params).fit(
                X_local, y_local
            )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        n_params = model.coef_.size + model.intercept_.size
        out[name] = {
            "wall": wall, "cpu": cpu, "comm_seconds": comm.stats.seconds, "collectives": comm.stats.calls,
            "values": comm.stats.values, "steps": counts["steps"], "cg": counts["cg"],
            "kinds": _classify(counts["sizes"], n_params, len(model.classes_)), "n_params": n_params,
            "coef": model.coef_.tolist() if rank == 0 else None,
        }  # fmt: skip
    with open(f"{spec['out']}.{rank}.json", "w") as handle:
        json.dump(out, handle)
    dist.destroy_process_group()
    del torch


# ------------------------------------------------------------------ parent
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, X_path: str, y_path: str, directory: str) -> list[dict]:
    spec = {"world": world, "port": _free_port(), "X": X_path, "y": y_path, "out": f"{directory}/w{world}"}
    procs = [
        subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), str(rank)])
        for rank in range(world)
    ]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError(f"a worker of world {world} failed")
    results = []
    for rank in range(world):
        with open(f"{spec['out']}.{rank}.json") as handle:
            results.append(json.load(handle))
    return results


def measured_rows(runs: dict[int, list[dict]]) -> list[dict]:
    rows = []
    reference = {name: np.asarray(runs[1][0][name]["coef"]) for name in FITS}
    single_cpu = {name: runs[1][0][name]["cpu"] for name in FITS}
    for world, results in runs.items():
        for name in FITS:
            coef = np.asarray(results[0][name]["coef"])
            deviation = np.abs(coef - reference[name]).max() / np.abs(reference[name]).max()
            for rank, result in enumerate(results):
                r = result[name]
                kinds = r["kinds"]
                rows.append({
                    "fit": name, "processes": world, "rank": rank, "wall s": r["wall"], "CPU s": r["cpu"],
                    "CPU x N / 1 process": r["cpu"] * world / single_cpu[name],
                    "in collectives s": r["comm_seconds"], "steps": r["steps"],
                    "CG iterations": r["cg"], "CPU ms / CG it.": 1e3 * r["cpu"] / max(r["cg"], 1),
                    "P-sized all-reduces": kinds["parameter-sized"], "K^2 all-reduces": kinds["class factor"],
                    "scalar all-reduces": kinds["scalars"], "other collectives": r["collectives"]
                    - kinds["parameter-sized"] - kinds["class factor"] - kinds["scalars"],
                    "values sent / step": r["values"] / max(r["steps"], 1),
                    "P-sized per CG it.": kinds["parameter-sized"] / max(r["cg"], 1),
                    "coef vs 1 process": deviation,
                })  # fmt: skip
    return rows


# ------------------------------------------------------------------ model
# The single-H200 full-batch fit of the ImageNet-sized probe (RESULTS.md, gpu_check.py section 4).
PROBE = {"n": 1281167, "d": 1024, "K": 1000, "seconds": 50.5, "steps": 21, "cg": 369, "bytes": 4}
LINKS = {
    # name: (all-reduce bus bandwidth in bytes/s, latency per ring hop in s)
    "NVLink (H100/H200 HGX, NCCL bus bandwidth 360 GB/s)": (360e9, 10e-6),
    "100 Gb/s Ethernet (11 GB/s achieved)": (11e9, 30e-6),
}
# Replicated (not split) work per step on each GPU: the eigendecomposition of
# the K x K Kronecker factor and the O(P) vector work of CG. Assumed, not
# measured on a GPU this round: 50 ms (cuSOLVER syevd at K = 1000 is about
# 10-40 ms; the margin covers the vector work). Once per fit: the d x d
# metric (two eigh) and the label gather, assumed 0.5 s.
SERIAL_PER_STEP = 0.05
SERIAL_ONCE = 0.5


def ring_allreduce_seconds(n_bytes: float, world: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce: ``2 (N - 1)`` hops of ``n_bytes / N`` each (reduce-scatter, then all-gather)."""
    if world == 1:
        return 0.0
    return 2 * (world - 1) * latency + 2 * (world - 1) / world * n_bytes / bandwidth


def scaling_model(worlds=(1, 2, 4, 8, 16)) -> list[dict]:
    """Modelled full-batch fit time of the ImageNet-sized probe on ``N`` GPUs.

    ``T(N) = serial + (T1 - serial) / N + comm(N)`` with ``serial = steps *
    SERIAL_PER_STEP + SERIAL_ONCE`` (replicated on every GPU) and ``comm(N)``
    the all-reduces counted in part 1 for this fit's shape: one of ``P + 1``
    values per step (gradient and loss), one of ``P`` per CG iteration, one
    of ``K^2`` per step (Kronecker factor), three scalars per step, and once
    ``d^2 + d + 1`` float64 (feature moments) plus the metric broadcast
    (``2 d^2 + 3 d`` float64) and the labels (``n`` int64, all-gathered).

    Returns
    -------
    list of dict
        One row per link and ``N``.
    """
    p = PROBE
    n_params = p["K"] * (p["d"] + 1)
    serial = p["steps"] * SERIAL_PER_STEP + SERIAL_ONCE
    parallel = p["seconds"] - serial
    rows = []
    for link, (bandwidth, latency) in LINKS.items():
        for world in worlds:

            def allreduce(values, itemsize=p["bytes"], world=world, bandwidth=bandwidth, latency=latency):
                return ring_allreduce_seconds(values * itemsize, world, bandwidth, latency)

            per_step = allreduce(n_params + 1) + allreduce(p["K"] ** 2) + 3 * allreduce(1)
            once = allreduce(p["d"] ** 2 + p["d"] + 1, 8) + allreduce(2 * p["d"] ** 2 + 3 * p["d"], 8)
            once += 0.0 if world == 1 else (world - 1) / world * p["n"] * 8 / bandwidth + world * latency
            comm = p["steps"] * per_step + p["cg"] * allreduce(n_params) + once
            total = serial + parallel / world + comm
            rows.append({
                "link": link, "GPUs": world, "compute s": serial + parallel / world, "communication s": comm,
                "fit s": total, "speed-up": p["seconds"] / total,
                "all-reduce ms / CG it.": 1e3 * allreduce(n_params),
            })  # fmt: skip
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args(argv)
    print(_common.machine_description())
    X, y = make_embeddings(args.rows, args.features, args.classes)
    with tempfile.TemporaryDirectory() as directory:
        X_path, y_path = f"{directory}/X.npy", f"{directory}/y.npy"
        np.save(X_path, X.astype(np.float32))
        np.save(y_path, y)
        del X
        runs = {world: run_world(world, X_path, y_path, directory) for world in args.worlds}
    rows = measured_rows(runs)
    shape = f"{args.rows}x{args.features}x{args.classes}"
    title = f"emb:{shape} raw, float32, gloo on localhost, 1 thread per process"
    markdown = f"### Measured: {title}\n\n" + _common.markdown_table(rows)
    model = scaling_model()
    markdown += "\n\n### Model: 1281167 x 1024 x 1000 full batch on N GPUs\n\n" + _common.markdown_table(
        model
    )
    print(markdown)
    _common.write_outputs("distributed", rows + model, markdown, {"measured": rows, "model": model}, False)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:4])
    else:
        main()
