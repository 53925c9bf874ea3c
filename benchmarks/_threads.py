"""Set BENCH_THREADS from ``--threads N`` before ``_common`` imports numpy and torch.

Imported first by the scripts that take ``--threads``; imports nothing heavy.
"""

import os


def preset_threads(argv: list[str], default: str = "2") -> None:
    """Export ``BENCH_THREADS`` from ``--threads N`` / ``--threads=N`` in ``argv``."""
    threads = default
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            threads = argv[i + 1]
        elif arg.startswith("--threads="):
            threads = arg.split("=", 1)[1]
    os.environ["BENCH_THREADS"] = threads
