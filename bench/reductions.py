"""Time the float64 reductions of one 1 MiB block, side by side: the fixed order (slerp.py) as
the compiled kernel a CPU actor runs (raymerge.native) and as torch operations (a GPU's code, and
a CPU's without a C compiler), against three float64 dots on one thread (no fixed order: their
bits depend on the BLAS and the thread count).

With ``--merge N``, also the whole merge of the ~0.85B pair (bench/parents.py), parents in the page
cache, with the compiled kernel and without it (``RAYMERGE_NATIVE=0``), alternated N times; medians.

    python bench/reductions.py [--reps 50] [--merge 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from raymerge.actors import _reuse_freed_memory  # noqa: E402
from raymerge.native import pair_sums  # noqa: E402
from raymerge.slerp import PAIRS, chunk_elems, torch_chunk_sums, total  # noqa: E402


def _dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    return float(a64 @ a64), float(b64 @ b64), float(a64 @ b64)


def _fixed(a: torch.Tensor, b: torch.Tensor):
    return total([torch_chunk_sums(a, b, chunk_elems(tuple(a.shape)))])


def _compiled(a: torch.Tensor, b: torch.Tensor):
    return total([pair_sums([a.reshape(-1), b.reshape(-1)], list(PAIRS), chunk_elems(tuple(a.shape)))])


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
        if pair_sums([a.reshape(-1)], [(0, 0)], 64) is not None:
            rows.append(("fixed order, compiled kernel (a CPU actor's), 1 thread", _median_ms(_compiled, a, b, reps)))
        for n in sorted({1, min(2, os.cpu_count() or 1)}):
            torch.set_num_threads(n)
            rows.append((f"fixed order, torch operations, {n} thread(s)", _median_ms(_fixed, a, b, reps)))
    finally:
        torch.set_num_threads(threads)
    lines = ["bench/reductions.py: the float64 reductions of one 1 MiB block (64 x 4096 bf16), "
             f"median of {reps}.", "", "| reduction | ms per block | vs three dots |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {ms / dots:.2f}x |" for name, ms in rows]
    return lines + [""] + gram_table(reps)


def gram_table(reps: int) -> list[str]:
    """Markdown lines: a Gram matrix of N inputs (the SLERP family's pass 1, mix.py) per 1 MiB
    block of each, against as many float64 dots, one thread."""
    from raymerge.family import FamilyMethod
    from raymerge.mix import GramSums

    g = torch.Generator().manual_seed(1)
    rows = []
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for n, base in ((3, False), (4, False), (4, True)):
            blocks = tuple(torch.randn(64, 4096, generator=g).to(torch.bfloat16) for _ in range(n + base))
            method = FamilyMethod("multislerp", base=base)

            def gram(*_):
                sums = GramSums(method, (64, 4096), n)
                sums.add(blocks)
                return sums.result()

            def dots(*_):
                flat = [x.reshape(-1).double() for x in blocks]
                if base:
                    flat = [x - flat[-1] for x in flat[:-1]]
                return [float(flat[i] @ flat[j]) for i in range(n) for j in range(i, n)]

            pairs = n * (n + 1) // 2
            d, k = _median_ms(dots, None, None, reps), _median_ms(gram, None, None, reps)
            what = f"{n} parents" + (" + base (task vectors)" if base else "")
            rows.append(f"| {what} | {pairs} | {k:.2f} | {d:.2f} | {k / d:.2f}x |")
    finally:
        torch.set_num_threads(threads)
    return ["The SLERP family's Gram matrix per 1 MiB block of each input (mix.py, fixed order, compiled "
            "kernel), against as many float64 dots (1 thread):", "",
            "| inputs | sums | Gram ms | dots ms | ratio |", "|---|---|---|---|---|", *rows]


def merge_table(reps: int) -> list[str]:
    """Markdown lines: the 0.85B pair's merge (embedded Ray, t = 0.5) with and without the kernel."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from parents import bench_parents
    from tracked import read_fully

    a, b = bench_parents()
    files = [os.path.join(p, f) for p in (a, b) for f in os.listdir(p) if f.endswith(".safetensors")]
    walls: dict[str, list[float]] = {"compiled kernel": [], "torch operations (RAYMERGE_NATIVE=0)": []}
    phases: dict[str, list[float]] = {name: [] for name in walls}  # the summary's "merge" phase
    work = tempfile.mkdtemp(prefix="raymerge-reductions-")
    try:
        for _ in range(reps):
            for name, native in zip(walls, ("1", "0")):
                read_fully(files)
                out = os.path.join(work, "out")
                env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAYMERGE_NATIVE": native}
                started = time.monotonic()
                done = subprocess.run([sys.executable, "-m", "raymerge.cli", "merge", a, b, "-o", out, "-t", "0.5"],
                                      check=True, env=env, capture_output=True, text=True)
                walls[name].append(time.monotonic() - started)
                phases[name].append(float(re.search(r", merge ([0-9.]+) s", done.stderr).group(1)))
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"bench/reductions.py --merge {reps}: `raymerge merge A B -t 0.5` of the ~0.85B pair (embedded Ray, "
             f"parents in the page cache), alternated; medians of {reps}.", "",
             "| reductions | command wall s | its merge phase s | merge phase, each run |", "|---|---|---|---|"]
    lines += [f"| {name} | {statistics.median(w):.1f} | {statistics.median(phases[name]):.1f} | "
              f"{', '.join(f'{x:.1f}' for x in phases[name])} |" for name, w in walls.items()]
    return lines


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--merge", type=int, default=0, help="also time the 0.85B merge, alternated this many times")
    args = p.parse_args()
    print("\n".join(reduction_table(args.reps)))
    if args.merge:
        print("\n" + "\n".join(merge_table(args.merge)))
