"""The spawn harness of the distributed tests: ranks in fresh processes, their results back.

Each worker pickles its result into ``root/result<rank>.pkl``; `spawn_ranks` starts the workers,
fails the test with a worker's own traceback when one raises, kills ranks that hang past the
timeout, and returns the results in rank order.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing as mp


def spawn_ranks(worker: Callable, args: tuple, nprocs: int, root: Path, label: str,
                timeout_s: float) -> list:
    """Runs ``worker(rank, *args)`` in ``nprocs`` spawned processes and returns what each
    pickled into ``root``; ``label`` names the case in a failure."""
    root.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    failure = None
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic()), grace_period=2):
            if time.monotonic() >= deadline:
                failure = (f"the workers did not finish within {timeout_s} s (a collective "
                           "only some ranks entered?)")
                break
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        failure = f"a worker failed:{exc}"  # the worker's own traceback
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    if failure is not None:
        pytest.fail(f"{label}: {failure}", pytrace=False)
    results = []
    for rank in range(nprocs):
        with open(root / f"result{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results
