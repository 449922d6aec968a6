"""What the SLERP family costs at size: the ~0.85B parents (bench/parents.py) and a third
fine-tune of A, each input evicted from the page cache before every run, so that every byte comes
from storage.

Contenders, round-robin: two-parent ``slerp`` (``-t 0.5``) of A and B; ``nuslerp`` of B and C
against the base A; ``multislerp`` of B and C against A; the same with a sweep of five weight
vectors (five children); ``karcher`` of A, B and C. Reported: median wall, bytes read from
storage during the run (``pgpgin``: the whole machine; the bench waits for a quiet one) against
the inputs' bytes, and the merge phase of raymerge's summary.

    .venv/bin/python bench/family_cost.py [--reps 3]      # prints a Markdown section
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from parents import CACHE, bench_parents  # noqa: E402
from realsize import evict, storage_read_bytes, weight_files  # noqa: E402
from tracked import measured, wait_quiet  # noqa: E402

from raymerge.synthetic import build_parent, llama_config  # noqa: E402

RAYMERGE = os.path.join(os.path.dirname(sys.executable), "raymerge")
SWEEP = ["1,1", "2,1", "1,2", "3,1", "1,3"]


def third_parent() -> str:
    """A third ~0.85B model, another fine-tune of parent A (built once, next to the pair)."""
    cfg = llama_config(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16)
    path = os.path.join(CACHE, "llama-0.85b-x1", "parent-c")
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_parent(path, cfg, seed=3, base=(cfg, 1), tokenizer=True, max_shard_bytes=10**9)
    return path


def family_section(reps: int) -> list[str]:
    a, b = bench_parents()
    c = third_parent()
    contenders = {
        "slerp A, B (-t 0.5)": ([a, b], ["-t", "0.5"]),
        "nuslerp B, C, base A": ([b, c], ["--method", "nuslerp", "--base", a]),
        "multislerp B, C, base A": ([b, c], ["--method", "multislerp", "--base", a]),
        "multislerp B, C, base A, 5 weight vectors": ([b, c], ["--method", "multislerp", "--base", a,
                                                              *[x for w in SWEEP for x in ("--weights", w)]]),
        "karcher A, B, C": ([a, b, c], ["--method", "karcher"]),
    }
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in contenders}
    names = list(contenders)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            parents, args = contenders[name]
            inputs = parents + ([args[args.index("--base") + 1]] if "--base" in args else [])
            files = [f for p in inputs for f in weight_files(p)]
            work = tempfile.mkdtemp(prefix="raymerge-family-cost-", dir="/tmp")
            os.sync()
            evict(files)
            wait_quiet()
            before = storage_read_bytes()
            run = measured([RAYMERGE, "merge", *parents, "-o", os.path.join(work, "out"), *args, "--quiet"], None)
            read = storage_read_bytes() - before
            shutil.rmtree(work, ignore_errors=True)
            if not run.ok:
                raise SystemExit(f"{name}: the merge failed")
            ratio = read / sum(map(os.path.getsize, files))
            runs[name].append((run.wall_s, ratio, run.phases.get("merge", float("nan"))))
            print(f"rep {rep + 1}/{reps} {name:44s} {run.wall_s:6.1f} s  read {ratio:.3f}x the inputs  "
                  f"merge phase {runs[name][-1][2]:.1f} s", flush=True)
    slerp = statistics.median(w for w, _, _ in runs[names[0]])
    lines = [f"bench/family_cost.py --reps {reps}: the ~0.85B parents (1.9 GB of bf16 each) and a third fine-tune "
             "of A, every input evicted from the page cache before each run; embedded Ray; medians.", "",
             "| merge | inputs | wall s | vs slerp | read from storage (x the inputs' bytes) | merge phase s |",
             "|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        wall = statistics.median(w for w, _, _ in rs)
        inputs = len(contenders[name][0]) + ("--base" in contenders[name][1])
        lines.append(f"| {name} | {inputs} | {wall:.1f} | {wall / slerp:.2f}x | "
                     f"{statistics.median(r for _, r, _ in rs):.3f} | {statistics.median(p for _, _, p in rs):.1f} |")
    return lines


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    print("\n".join(family_section(p.parse_args().reps)))
