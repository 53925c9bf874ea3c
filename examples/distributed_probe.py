"""A linear probe fitted data-parallel: every process holds a shard of the embeddings.

Run on one machine with two CPU processes (gloo)::

    torchrun --nproc_per_node=2 examples/distributed_probe.py

or with one process per GPU (NCCL)::

    torchrun --nproc_per_node=8 examples/distributed_probe.py --device cuda

Run as a plain script (``python examples/distributed_probe.py``) it starts two
local CPU processes itself, as torchrun would. Across machines, add torchrun's
``--nnodes``, ``--node_rank`` and ``--rdzv_endpoint``. Each rank builds the
same synthetic embeddings and keeps its contiguous slice of rows (in a real
job it would load only its own file); ``FGNClassifier(distributed=True)`` then fits on the union of the
shards, reducing every sum over rows across the ranks. Every rank ends with
the same model; rank 0 prints it against a single-process fit on all rows.
"""

import argparse
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

from sklearn_fgn import FGNClassifier


def make_embeddings(n, d, n_classes, seed=0):
    """Rows L2-normalised, covariance spectrum ``j^-2``, class means decaying one power faster."""
    rng = np.random.default_rng(seed)
    j = np.arange(1, d + 1)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    means = rng.standard_normal((n_classes, d)) * j**-1.5 * 2.0
    y = rng.integers(0, n_classes, size=n)
    X = (means[y] + rng.standard_normal((n, d)) * j**-1.0) @ basis.T
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="'cpu' (gloo) or 'cuda' (NCCL, one GPU per rank)")
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--processes", type=int, default=2, help="local processes when not run by torchrun")
    return parser.parse_args(argv)


def main(args):
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun's environment says where the others are
    rank, world = dist.get_rank(), dist.get_world_size()

    X, y = make_embeddings(args.rows + 10000, 256, 50)
    X_train, y_train, X_test, y_test = X[: args.rows], y[: args.rows], X[args.rows :], y[args.rows :]
    bounds = np.linspace(0, args.rows, world + 1).astype(int)
    shard = slice(bounds[rank], bounds[rank + 1])  # this rank's rows, in rank order

    model = FGNClassifier(alpha=1.0, batch_size=None, device=args.device, distributed=True, random_state=0)
    start = time.perf_counter()
    model.fit(X_train[shard], y_train[shard])
    seconds = time.perf_counter() - start
    print(f"rank {rank}/{world}: {shard.stop - shard.start} rows, {model.n_iter_} steps, {seconds:.2f} s")

    if rank == 0:
        single = FGNClassifier(alpha=1.0, batch_size=None, device=args.device, random_state=0)
        single.fit(X_train, y_train)
        gap = np.abs(model.coef_ - single.coef_).max() / np.abs(single.coef_).max()
        print(
            f"test accuracy: distributed {model.score(X_test, y_test):.4f}, "
            f"single process {single.score(X_test, y_test):.4f}; coefficients differ by {gap:.1e} (relative)"
        )
    dist.destroy_process_group()


def _local_rank(rank, world, port, args):
    """One of the processes a plain ``python`` run starts: torchrun's environment, then ``main``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # fmt: skip
    main(args)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    args = parse_args()
    if "RANK" in os.environ:  # started by torchrun
        main(args)
    elif args.device != "cpu":
        raise SystemExit(
            "Run GPU ranks with torchrun: "
            "torchrun --nproc_per_node=N examples/distributed_probe.py --device cuda"
        )
    else:
        print(f"Not started by torchrun: running {args.processes} local CPU processes (gloo) on 127.0.0.1.")
        torch.multiprocessing.spawn(_local_rank, args=(args.processes, _free_port(), args),
                                    nprocs=args.processes)  # fmt: skip
