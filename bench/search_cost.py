"""What one `raymerge search` trial costs, against the other ways to pay for one candidate schedule.

On the ~0.85B pair (bench/parents.py), one held-out text (``--words`` words of the parents' own
vocabulary), context 128, on an embedded local Ray:
- **search trial**: the median ``seconds`` of the finished trials of one
  ``raymerge search --parallel 1`` (the child built in memory from pass 1's reductions, then scored
  on the dev pieces and the test part);
- **--eval sweep point**: the marginal cost of one more t in a scored sweep,
  (wall of ``merge -t 0.3 -t 0.5 -t 0.7 --eval`` - wall of ``merge -t 0.5 --eval``) / 2, both
  with ``--keep best``;
- **mergekit per candidate**: the way a mergekit user pays for one schedule: ``mergekit-yaml`` of the
  search's best recipe (per-layer t), then a new Python that loads the child with transformers and
  scores the same text with the same windows (raymerge.scoring). Its wall, median of ``--reps``.

    python bench/search_cost.py [--trials 10] [--reps 2] [--words 900]

Prints a Markdown section on stdout (bench.py puts it in BENCHMARKS.md); progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mergekit_recipe import ensure_mergekit, mergekit_view  # noqa: E402
from parents import bench_parents  # noqa: E402

CONTEXT = 128
RAYMERGE = [sys.executable, "-m", "raymerge.cli"]
SCORE = """
import sys, time
from transformers import AutoModelForCausalLM, AutoTokenizer
from raymerge.scoring import make_windows, score
child, parent, text = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(child, torch_dtype="auto")
windows = make_windows(AutoTokenizer.from_pretrained(parent), open(text).read(), int(sys.argv[4]))
print(score(model, windows).bits / len(open(text).read().encode()))
"""


def log(msg: str) -> None:
    print(f"[search_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(cmd: list[str], env: dict | None = None) -> float:
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def held_out_text(work: str, words: int) -> str:
    r = random.Random(0)
    path = os.path.join(work, "heldout.txt")
    with open(path, "w") as f:
        f.write(" ".join(f"w{r.randrange(30000)}" for _ in range(words)) + "\n")
    return path


def search_section(trials: int = 10, reps: int = 2, words: int = 900, env: dict | None = None) -> list[str]:
    """Markdown lines: the table of the module's docstring, from one run of each contender."""
    a, b = bench_parents()
    work = tempfile.mkdtemp(prefix="raymerge-search-cost-")
    env = env or {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        text = held_out_text(work, words)
        common = ["--eval", text, "--context", str(CONTEXT), "--quiet"]

        log(f"raymerge search, {trials} trials")
        searched = os.path.join(work, "searched")
        search_wall = timed([*RAYMERGE, "search", a, b, "-o", searched, "--trials", str(trials),
                             "--parallel", "1", *common], env)
        rows = pq.read_table(os.path.join(searched, "search.parquet")).to_pylist()
        finished = [r for r in rows if not r["stopped_early"]]
        trial = statistics.median(r["seconds"] for r in finished)
        dev_windows = max(r["dev_windows"] for r in rows)

        log("--eval sweeps of 1 and 3 points")
        sweep = {}
        for ts in (["0.5"], ["0.3", "0.5", "0.7"]):
            out = os.path.join(work, f"sweep-{len(ts)}")
            sweep[len(ts)] = timed([*RAYMERGE, "merge", a, b, "-o", out, *[x for t in ts for x in ("-t", t)],
                                    "--keep", "best", *common], env)
            shutil.rmtree(out)
        point = (sweep[3] - sweep[1]) / 2

        exe, note = ensure_mergekit()
        peer = None
        if exe:
            views = [mergekit_view(p_, os.path.join(work, f"view-{label}")) for p_, label in ((a, "a"), (b, "b"))]
            with open(os.path.join(searched, "recipe.yml")) as f:
                recipe = yaml.safe_load(f)
            recipe["base_model"] = views[0]
            recipe["models"] = [{"model": v} for v in views]
            recipe_path = os.path.join(work, "recipe.yml")
            with open(recipe_path, "w") as f:
                yaml.safe_dump(recipe, f, sort_keys=False)
            walls = []
            for rep in range(reps):
                log(f"mergekit-yaml + load + score, rep {rep + 1}/{reps}")
                child = os.path.join(work, "mergekit-child")
                started = time.monotonic()
                timed([exe, recipe_path, child], env)
                timed([sys.executable, "-c", SCORE, child, a, text, str(CONTEXT)], env)
                walls.append(time.monotonic() - started)
                shutil.rmtree(child)
            peer = statistics.median(walls)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [f"bench/search_cost.py --trials {trials} --reps {reps} --words {words}: the ~0.85B pair, a text of "
             f"{words} words, context {CONTEXT}, {dev_windows} dev windows plus the test part. {len(finished)} of "
             f"{len(rows)} trials finished; the whole search took {search_wall:.0f} s (pass 1, {len(rows)} trials, "
             "both parents scored, the best child written).", "",
             "| per candidate schedule | seconds | vs mergekit |", "|---|---|---|"]
    for name, s in (("raymerge search trial (median of the finished trials)", trial),
                    ("raymerge `--eval` sweep point (marginal, one more t)", point),
                    ("mergekit-yaml + transformers load + the same scoring (median)", peer)):
        ratio = f"{s / peer:.2f}x" if peer and s is not None else "-"
        lines.append(f"| {name} | {'-' if s is None else f'{s:.1f}'} | {ratio} |")
    return lines + ["", f"{note}."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--words", type=int, default=900)
    args = p.parse_args()
    print("\n".join(search_section(args.trials, args.reps, args.words)))


if __name__ == "__main__":
    main()
