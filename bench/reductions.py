"""Time the float64 reductions of one 1 MiB block, side by side: slerp.py's fixed-order chunks
(elementwise, any thread count) against three float64 dots on one thread (what the actors ran
before the order was fixed, when one thread was what kept the bits the same).

    python bench/reductions.py [--reps 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from raymerge.actors import _reuse_freed_memory  # noqa: E402
from raymerge.slerp import chunk_elems, chunk_sums, total  # noqa: E402


def _dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    return float(a64 @ a64), float(b64 @ b64), float(a64 @ b64)


def _fixed(a: torch.Tensor, b: torch.Tensor):
    return total([chunk_sums(a, b, chunk_elems(tuple(a.shape)))])


def _median_ms(fn, a, b, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn(a, b)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def reduction_table(reps: int = 50) -> list[str]:
    """Markdown lines: median milliseconds per 1 MiB block (64 x 4096 bf16 rows, as float32 bytes)."""
    _reuse_freed_memory()  # as in an actor: otherwise each fresh float64 copy page-faults anew
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 4096, generator=g).to(torch.bfloat16)
    b = torch.randn(64, 4096, generator=g).to(torch.bfloat16)
    threads = torch.get_num_threads()
    rows = []
    try:
        torch.set_num_threads(1)
        dots = _median_ms(_dots, a, b, reps)
        rows.append(("three float64 dots, 1 thread", dots))
        for n in sorted({1, min(2, os.cpu_count() or 1)}):
            torch.set_num_threads(n)
            rows.append((f"fixed-order chunks, {n} thread(s)", _median_ms(_fixed, a, b, reps)))
    finally:
        torch.set_num_threads(threads)
    lines = ["bench/reductions.py: the float64 reductions of one 1 MiB block (64 x 4096 bf16), "
             f"median of {reps}.", "", "| reduction | ms per block | vs three dots |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {ms / dots:.2f}x |" for name, ms in rows]
    return lines


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=50)
    print("\n".join(reduction_table(p.parse_args().reps)))
