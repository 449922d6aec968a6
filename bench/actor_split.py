"""Inside one actor: what the write-behind thread and the allocator setting buy, side by side.

    .venv/bin/python bench/actor_split.py [--reps 5]          # prints a Markdown table

Drives one MergeActor in-process (no Ray) over the benchmark parents: one ``write`` call per shard
(each tensor read, reduced, combined and written into one shard file per shard, fsynced).
Each run is a fresh process, in one of three variants, alternated rep by rep:

- ``inline``: blocks written inline, with all the actor's threads given to torch, and glibc's
  default allocator behaviour;
- ``kept buffers``: the same, with freed block buffers kept for reuse (``_reuse_freed_memory``,
  what ``owns_process=True`` turns on);
- ``kept buffers, writer thread``: what raymerge's Ray actors run: kept buffers, and blocks
  written on a background thread while torch computes the next ones on the remaining CPUs.

For 2 threads (one actor owning this machine) and 1 thread (one of two actors). Reports medians of
the wall time and of the process's minor page faults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("inline", "kept buffers", "kept buffers, writer thread")


def one_run(a_dir: str, b_dir: str, threads: int, variant: str) -> dict:
    """One run in this process; returns its seconds and minor faults."""
    import torch

    import raymerge.actors as actors
    from raymerge.options import MergeOptions
    from raymerge.parents import load_parent
    from raymerge.plan import build_plan

    if variant == "inline":
        actors._reuse_freed_memory = lambda: None
    if variant != "kept buffers, writer thread":
        class Inline:  # writes each block before computing the next
            def __init__(self, depth: int = 0):
                pass

            def submit(self, shard, offset, tensor):
                shard.write_tensor(offset, tensor)

            def drain(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *_):
                pass

        actors.WriteBehind = Inline
        torch.set_num_threads(threads)
        torch.set_num_threads = lambda n: None  # keep every thread for torch
    out = tempfile.mkdtemp(prefix="actor-split-", dir="/tmp")
    try:
        options = MergeOptions(a=a_dir, b=b_dir, out=out, t=(0.5,))
        plan = build_plan((load_parent(a_dir, "A"), load_parent(b_dir, "B")), options, 1)
        actor = actors.MergeActor(options.block_bytes, num_threads=threads, owns_process=True)  # as in Ray
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for i, shard in enumerate(plan.shards):
            actor.write(actors.WriteJob.for_shard(plan, i, (os.path.join(out, shard.filename),),
                                                  ts={t.name: (0.5,) for t in plan.tensors if t.op == "slerp"}))
        f1, t1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        return {"merge_s": t1 - t0, "faults": f1 - f0}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def split_table(a_dir: str, b_dir: str, reps: int, quiet_wait=None, env: dict | None = None) -> list[str]:
    """Run every variant ``reps`` times for 2 and 1 threads, alternating; Markdown lines.

    ``env`` is the runs' environment (bench.py points PYTHONPATH at its frozen copy of raymerge).
    """
    results: dict[tuple[int, str], list[dict]] = {}
    for rep in range(reps):
        for threads in (2, 1):
            for variant in VARIANTS[rep % 3:] + VARIANTS[:rep % 3]:
                if quiet_wait:
                    quiet_wait()
                got = subprocess.run([sys.executable, __file__, "--one", a_dir, b_dir, str(threads), variant],
                                     capture_output=True, text=True, env=env)
                if got.returncode != 0:
                    raise RuntimeError(f"actor_split {variant}: {got.stderr[-2000:]}")
                r = json.loads(got.stdout.strip().splitlines()[-1])
                results.setdefault((threads, variant), []).append(r)
                print(f"actor split rep {rep + 1}/{reps}  threads {threads}  {variant:28s}  "
                      f"{r['merge_s']:5.2f} s  faults {r['faults']}", flush=True)
    lines = ["| threads | variant | merge s | minor page faults | runs |", "|---|---|---|---|---|"]
    for (threads, variant), rs in results.items():
        merge_s = statistics.median(r["merge_s"] for r in rs)
        worst = max(r["merge_s"] for r in rs)
        faults = statistics.median(r["faults"] for r in rs)
        lines.append(f"| {threads} | {variant} | {merge_s:.2f} (worst {worst:.2f}) | {faults:,.0f} | {len(rs)} |")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        a_dir, b_dir, threads, variant = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        print(json.dumps(one_run(a_dir, b_dir, threads, variant)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, HERE)
    from parents import bench_parents

    print("\n".join(split_table(*bench_parents(), args.reps)))


if __name__ == "__main__":
    main()
