"""How many worker processes a stage uses."""
from __future__ import annotations

import os


def resolve_workers(workers: int) -> int:
    """`workers` itself, or one per CPU core this process may run on (its affinity mask: a container or `taskset`
    limit, not the machine's count) for 0."""
    if workers < 0:
        raise ValueError(f"features.workers must be >= 0 (0 = one per CPU core), got {workers}")
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
