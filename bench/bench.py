"""raymerge against its I/O floor and against mergekit, side by side on this machine.

    .venv/bin/python bench/bench.py [--reps 3] [--scale 1] [--scale2] [--no-7b] [--7b-reps 3]
                                    [--tiny-reps 5] [--out BENCHMARKS.md]

What it measures, on the two ~0.85B bf16 Llama parents of bench/parents.py (``--scale 2``: twice
the layers), every contender as its own command, round-robin (rep r starts at contender r), ``--reps``
times each; medians, min and max of wall time, and the peak own memory (RssAnon + RssShmem, as in
bench/measure.py) of the largest process and of all processes together:

- I/O floor (bench/iofloor.py --cached): read both parents' weight files (from the page cache),
  write one model-sized file (O_DIRECT), fsync;
  and the same writing nine model-sized files (a 9-value sweep's floor);
- raymerge cold: ``raymerge merge A B -o OUT -t 0.5 --quiet``, starting its own embedded Ray;
- raymerge warm: the same with ``--address`` to a Ray head (token auth) started for each rep's
  warm runs, also with ``--workers 1`` and ``--workers 2``, as a 9-value sweep
  (``-t 0.1 ... -t 0.9``), and as an 11-value sweep (``--t-range 0:1:0.1``) that scores every t
  and both parents on a short text and writes only the best child (``--eval --keep best``),
  against the same sweep writing all 11; no head runs while the other contenders run;
- mergekit 0.1.5 (its own venv, see bench/mergekit_recipe.py) on the equivalent slerp recipe, as
  is and followed by a ``sync`` of its output files (raymerge fsyncs its shards; mergekit does not).

Before each run both parents are read once (untimed), so every contender starts with them in page
cache. Outputs go to a fresh temporary directory under /tmp, deleted after the run. For warm runs
the memory total includes the head's processes (its actors are where the work happens).
``--scale2`` adds one raymerge cold run on the scale-2 parents (built if missing; ~7 GB) to check
that peak memory per process does not grow with model size. bench/actor_split.py then times one
actor's merge in-process, with and without this code's write-behind thread and allocator
setting, and bench/reductions.py times the float64 reductions of one block, fixed-order chunks
against the float64 dots they replaced. Each raymerge run's own ``time:`` line gives where its time goes. Last come the two
sections of bench/realsize.py: tiny parents from prompt to prompt (raymerge as ``pip install .``
installs it, and with the test extras, against mergekit), and the 7B-shaped pair read from
storage (parents evicted before every run; skipped with a note when the disk lacks room).
bench/objectstore.py adds a merge with parents and child in a bucket of a local S3 server against
the same merge on local disk.
The results go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests")]

from mergekit_recipe import (MERGEKIT_FLAGS, compare_outputs, ensure_mergekit,  # noqa: E402
                             mergekit_view, write_recipe)
from actor_split import split_table  # noqa: E402
from objectstore import objectstore_section  # noqa: E402
from reductions import merge_table, reduction_table  # noqa: E402
from search_cost import search_section  # noqa: E402
from parents import bench_parents  # noqa: E402
from raynodes import RayNode  # noqa: E402
from realsize import fmt, seven_b_section, tiny_section, weight_files  # noqa: E402
from tracked import Run, measured, read_fully, wait_quiet  # noqa: E402

BIN = os.path.dirname(sys.executable)
RAYMERGE = os.path.join(BIN, "raymerge")
SWEEP = [round(0.1 * i, 1) for i in range(1, 10)]
EVAL_SWEEP = "0:1:0.1"  # 11 values of t
EVAL_WORDS = 127  # a held-out text of the parents' own words (~0.7 KB): one 128-token window with BOS
MIB = 1024
CONTENDED = 0.35  # CPUs busy with other processes during a run, above which it is repeated


@dataclass
class Contender:
    name: str
    argv: Callable[[str, str | None], list[str]]  # (output path, head address) -> command line
    env: dict[str, str] | None = None
    warm: bool = False  # runs against the Ray head; its memory includes the head's process tree
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    def good(self) -> list[float]:
        return [r.wall_s for r in self.runs if r.ok]

    def median(self) -> float | None:
        return statistics.median(self.good()) if self.good() else None


def snapshot(work: str, worktree: bool) -> tuple[str, str]:
    """Copy the raymerge package (git HEAD, or the working tree) into work/src, for PYTHONPATH.

    raymerge is installed editable and may be edited while the bench runs; every raymerge process
    (CLI, embedded Ray, the head's workers) imports this frozen copy instead. Returns (dir, what).
    """
    src = os.path.join(work, "src")
    os.makedirs(src)
    git = ["git", "-C", ROOT]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not worktree and head:
        archive = subprocess.Popen(git + ["archive", "HEAD", "raymerge"], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", src], stdin=archive.stdout, check=True)
        archive.wait()
        return src, f"raymerge at commit {head}"
    shutil.copytree(os.path.join(ROOT, "raymerge"), os.path.join(src, "raymerge"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    dirty = subprocess.run(git + ["status", "--porcelain", "raymerge"], capture_output=True, text=True).stdout.strip()
    return src, f"raymerge working tree (commit {head or '?'}{' plus uncommitted changes' if dirty else ''})"


def start_head(workdir: str, env: dict[str, str]) -> RayNode:
    """One Ray head on 127.0.0.1 with 2 CPUs and token auth; stopped by the pids it spawned."""
    node = RayNode(os.path.join(workdir, "ray-head.log"), num_cpus=2, env=env)
    node.wait_ready(timeout=120)
    return node


def contenders(a: str, b: str, work: str, plain_env: dict[str, str], rm_env: dict[str, str],
               auth_env: dict[str, str], mergekit: str | None, mk_note: str) -> list[Contender]:
    out_bytes = sum(os.path.getsize(f) for f in weight_files(a))
    files = weight_files(a) + weight_files(b)
    merge = [RAYMERGE, "merge", a, b, "--quiet"]
    single = ["-t", "0.5"]
    floor = [sys.executable, os.path.join(HERE, "iofloor.py"), "--cached"]  # the parents are in page cache
    cs = [Contender("I/O floor", lambda o, _: floor + [o, str(out_bytes), *files], plain_env),
          Contender("I/O floor, 9 models", lambda o, _: floor + ["--copies", "9", o, str(out_bytes), *files],
                    plain_env),
          Contender("raymerge cold (embedded Ray)", lambda o, _: merge + ["-o", o, *single], rm_env)]

    def warm(name: str, *extra: str) -> Contender:
        return Contender(name, lambda o, h: merge + ["--address", h, "-o", o, *extra], auth_env, True)

    text = eval_text(work)
    cs += [warm("raymerge warm (default actors)", *single),
           warm("raymerge warm --workers 1", *single, "--workers", "1"),
           warm("raymerge warm --workers 2", *single, "--workers", "2"),
           warm("raymerge warm 9-t sweep", *[x for t in SWEEP for x in ("-t", str(t))]),
           warm("raymerge warm 11-t sweep, --eval --keep best", "--t-range", EVAL_SWEEP, "--eval", text,
                "--context", "128", "--keep", "best"),
           warm("raymerge warm 11-t sweep, all 11 written", "--t-range", EVAL_SWEEP)]
    if mergekit:
        recipe = write_recipe(os.path.join(work, "recipe.yml"), mergekit_view(a, os.path.join(work, "mk-a")),
                              mergekit_view(b, os.path.join(work, "mk-b")))
        cs.append(Contender("mergekit 0.1.5", lambda o, _: [mergekit, recipe, o, *MERGEKIT_FLAGS], plain_env))
        # mergekit leaves its output in the page cache; raymerge and the floors fsync theirs.
        cs.append(Contender("mergekit 0.1.5, then sync of its output",
                            lambda o, _: ["sh", "-c", '"$0" "$@" && sync "$2"/*.safetensors',
                                          mergekit, recipe, o, *MERGEKIT_FLAGS], plain_env))
    else:
        cs.append(Contender("mergekit 0.1.5", lambda o, _: [], plain_env, note=mk_note))
    return cs


def best_run(c: Contender, label: str, address: str | None, parent_files: list[str], retries: int,
             keep: bool) -> tuple[Run, str | None, str | None]:
    """Run ``c`` until one attempt is not contended (at most ``retries`` more times).

    Returns the least contended run, and with ``keep`` the output kept for the correctness
    checks (the sweep keeps t-0.5 only) and the temporary directory holding it.
    """
    best: Run | None = None
    for attempt in range(1 + retries):
        tmp = tempfile.mkdtemp(prefix="raymerge-bench-", dir="/tmp")
        out = os.path.join(tmp, "model.safetensors" if c.name.startswith("I/O floor") else "child")
        read_fully(parent_files)
        wait_quiet()
        run = measured(c.argv(out, address), c.env)
        print(f"{label}  {c.name:34s} {run.wall_s:7.1f} s  {'ok' if run.ok else 'FAILED'}  "
              f"peak process {run.peak_process_kb / MIB:5.0f} MiB  total {run.peak_total_kb / MIB:5.0f} MiB  "
              f"other load {run.other_cpus:.2f} CPUs", flush=True)
        if best is None or run.other_cpus < best.other_cpus:
            best = run
        done = not run.ok or run.other_cpus <= CONTENDED or attempt == retries
        if done and keep and run.ok:
            kept = os.path.join(out, "t-0.5") if "sweep" in c.name else out
            for extra in glob.glob(os.path.join(out, "t-*")):
                if extra != kept:
                    shutil.rmtree(extra)
            return best, kept, tmp
        shutil.rmtree(tmp, ignore_errors=True)
        if done:
            return best, None, None
        print("  (contended: repeating this run)", flush=True)
    raise AssertionError("unreachable: the last attempt is always done")


def run_all(cs: list[Contender], reps: int, parent_files: list[str], start_head: Callable[[], RayNode],
            retries: int = 2) -> list[str]:
    """Round-robin reps; returns the lines of the correctness checks done on rep 0's outputs.

    Each rep runs the contenders that need no Ray head first, with none running (a live head
    would slow an embedded Ray's start by seconds, which a laptop user never pays), then starts a
    head, runs the warm contenders against it and stops it. A run during which other processes
    kept more than CONTENDED CPUs busy is repeated (at most ``retries`` times); the least
    contended attempt is the one recorded.
    """
    kept: dict[str, str] = {}  # contender -> its rep-0 output, kept for the checks
    kept_tmp: list[str] = []
    checks: list[str] = []
    for rep in range(reps):
        for warm in (False, True):
            group = [c for c in cs if c.warm == warm and not c.note]
            if not group:
                continue
            group = group[rep % len(group):] + group[:rep % len(group)]
            try:
                node = start_head() if warm else None
            except RuntimeError as e:
                print(f"rep {rep + 1}/{reps}: warm contenders skipped: {e}", flush=True)
                continue
            try:
                for c in group:
                    keep = rep == 0 and c.name.startswith(("raymerge cold", "mergekit", "raymerge warm 9"))
                    run, out, tmp = best_run(c, f"rep {rep + 1}/{reps}", node.address if node else None,
                                             parent_files, retries, keep)
                    c.runs.append(run)
                    if out:
                        kept[c.name] = out
                        kept_tmp.append(tmp)
            finally:
                if node:
                    node.stop()
        if rep == 0:
            checks = correctness(kept)
            for line in checks:
                print(line, flush=True)
            for tmp in kept_tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    return checks


def correctness(kept: dict[str, str]) -> list[str]:
    cold = kept.get("raymerge cold (embedded Ray)")
    lines = []
    if cold and "mergekit 0.1.5" in kept:
        try:
            lines.append(compare_outputs(cold, kept["mergekit 0.1.5"]))
        except Exception as e:  # noqa: BLE001 - a check, never a reason to stop the bench
            lines.append(f"mergekit vs raymerge: comparison failed: {e}")
    sweep = kept.get("raymerge warm 9-t sweep")
    if cold and sweep:
        same = all(subprocess.run(["cmp", "-s", os.path.join(cold, os.path.basename(f)), f]).returncode == 0
                   for f in glob.glob(os.path.join(sweep, "*.safetensors")))
        lines.append(f"sweep t-0.5 vs single-t 0.5: shards {'byte-identical' if same else 'DIFFER'}")
    return lines


def machine(note: str = "") -> str:
    """The machine and when: what BENCHMARKS.md's Machine line says (``note``: what the bench
    cannot see for itself, such as a disk shared with other machines)."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem / 2**20:.1f} GiB RAM, no GPU{', ' + note if note else ''};\n  "
            f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")


def phase_table(cs: list[Contender]) -> list[str]:
    """Where raymerge's time goes: medians of the phases its summary reports, per contender."""
    timed = [c for c in cs if any(r.phases for r in c.runs if r.ok)]
    if not timed:
        return []
    names: list[str] = []
    for c in timed:
        for r in c.runs:
            names += [n for n in r.phases if n not in names]
    rows = []
    for c in timed:
        runs = [r for r in c.runs if r.ok and r.phases]
        cells = [fmt(statistics.median(r.phases.get(n, 0.0) for r in runs)) for n in names]
        outside = statistics.median(r.wall_s - sum(r.phases.values()) for r in runs)
        rows.append(f"| {c.name} | {' | '.join(cells)} | {fmt(outside)} | {fmt(c.median())} |")
    scored = [c for c in timed if any(r.scoring for r in c.runs if r.ok)]
    for c in scored:
        runs = [r for r in c.runs if r.ok and r.scoring]
        rows.append("")
        rows.append(f"{c.name}: its score phase, summed over the scoring actors (medians): models built in "
                    f"memory (children) or loaded (parents) {fmt(statistics.median(r.scoring['build'] for r in runs))} s, "
                    f"scored {fmt(statistics.median(r.scoring['score'] for r in runs))} s.")
    return ["## Where the time goes", "",
            "Medians, in seconds, of the phases raymerge's summary reports (`time:` line); \"outside\" is "
            "the rest of the command's wall time: starting Python, importing torch and Ray, exiting.", "",
            f"| contender | {' | '.join(names)} | outside | wall |",
            "|---|" + "---|" * (len(names) + 2), *rows, ""]


def report(cs: list[Contender], checks: list[str], scale2: Run | None, split: list[str],
           args: argparse.Namespace, parents: tuple[str, str], mk_note: str,
           sections: tuple[list[str], list[tuple]] = ([], [])) -> str:
    by = {c.name: c for c in cs}
    floor, mk = by["I/O floor"].median(), by["mergekit 0.1.5"].median()

    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x and y else None

    rows = []
    for c in cs:
        med, walls = c.median(), c.good()
        proc = max((r.peak_process_kb / MIB for r in c.runs), default=None)
        total = max((r.peak_total_kb / MIB for r in c.runs), default=None)
        other = max((r.other_cpus for r in c.runs), default=None)
        rows.append(f"| {c.name} | {fmt(med)} | {fmt(min(walls, default=None))} / {fmt(max(walls, default=None))} | "
                    f"{len(walls)}/{len(c.runs)} | {fmt(ratio(med, floor), '.2f', '×')} | "
                    f"{fmt(ratio(med, mk), '.2f', '×')} | {fmt(proc, '.0f')} | {fmt(total, '.0f')} | "
                    f"{fmt(other, '.2f')} |")
    med = {n: c.median() for n, c in by.items()}
    cold, warm = med["raymerge cold (embedded Ray)"], med.get("raymerge warm (default actors)")
    w1, w2, sweep = med.get("raymerge warm --workers 1"), med.get("raymerge warm --workers 2"), med.get("raymerge warm 9-t sweep")

    raymerge_peak = max([r.peak_process_kb for c in cs if c.name.startswith("raymerge") for r in c.runs]
                        + ([scale2.peak_process_kb] if scale2 else []), default=None)
    targets = [
        ("raymerge cold ≤ 0.6× mergekit", ratio(cold, mk), lambda v: v <= 0.6, "×"),
        ("raymerge warm ≤ 0.45× mergekit", ratio(warm, mk), lambda v: v <= 0.45, "×"),
        ("raymerge warm ≤ 2.5× I/O floor", ratio(warm, floor), lambda v: v <= 2.5, "×"),
        ("raymerge cold ≤ 2.5× I/O floor", ratio(cold, floor), lambda v: v <= 2.5, "×"),
        ("2 actors ≥ 1.5× faster than 1 (t1 / t2)", ratio(w1, w2), lambda v: v >= 1.5, "×"),
        ("9-t sweep ≤ 3.5× single t (warm)", ratio(sweep, warm), lambda v: v <= 3.5, "×"),
        ("no raymerge process > 1.5 GB (1431 MiB)", raymerge_peak and raymerge_peak / MIB, lambda v: v <= 1.5e9 / 2**20, " MiB"),
        *sections[1],
    ]
    lines = ["# Benchmarks", "", "Every figure below comes from one run:", "",
             f"- Command: `{' '.join(['.venv/bin/python bench/bench.py'] + sys.argv[1:])}` "
             f"({args.reps} reps per contender, round-robin; medians).",
             f"- Code: {args.code}, imported from a copy made when the bench started.",
             f"- Machine: {machine(args.machine_note)}.", "",
             f"Parents: `{parents[0]}` and `{parents[1]}` (bench/parents.py, scale {args.scale}; "
             f"{sum(map(os.path.getsize, weight_files(parents[0]))) / 1e9:.2f} GB of bf16 weights each). "
             "Single t = 0.5.", "",
             "| contender | median wall s | min / max s | ok runs | × I/O floor | × mergekit | peak process MiB | peak total MiB | other load |",
             "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    if scale2:
        lines += [f"Scale 2 (twice the layers, one raymerge cold run): {scale2.wall_s:.1f} s, "
                  f"peak process {scale2.peak_process_kb / MIB:.0f} MiB, peak total {scale2.peak_total_kb / MIB:.0f} MiB"
                  f"{'' if scale2.ok else ' (FAILED)'}.", ""]
    if sweep and warm:
        floor9 = med.get("I/O floor, 9 models")
        lines += [f"9-t sweep: {sweep:.1f} s = {sweep / warm:.2f}× one warm single-t run, "
                  f"{sweep / (9 * warm):.2f}× nine of them ({9 * warm:.1f} s)"
                  + (f", {sweep / floor9:.2f}× the I/O floor of writing nine models ({floor9:.1f} s)." if floor9 else "."),
                  ""]
    mk_sync = med.get("mergekit 0.1.5, then sync of its output")
    if mk_sync and cold and warm:
        lines += [f"Against mergekit with its output synced to disk, as raymerge's is ({mk_sync:.1f} s): "
                  f"raymerge cold {cold / mk_sync:.2f}×, warm {warm / mk_sync:.2f}×.", ""]
    lines += phase_table(cs)
    lines += sections[0]
    lines += ["## Inside one actor", "",
              "bench/actor_split.py: one MergeActor driven in-process (no Ray) over the same parents, one `write` "
              "call per shard (each tensor read, reduced, combined and written; fsynced); each run a fresh process, "
              "variants alternated. *inline*: blocks written "
              "inline, all threads to torch, glibc's default allocator; *kept buffers*: the same with freed block "
              "buffers kept for reuse (mallopt); *kept buffers, writer thread* (what raymerge does): kept buffers "
              "and blocks written on a background thread while torch computes on the other CPUs. Medians.", "",
              *split, ""]
    lines += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    for label, value, ok, unit in targets:
        lines.append(f"| {label} | {fmt(value, '.2f' if unit == '×' else '.0f', unit)} | "
                     f"{'n/a' if value is None else ('met' if ok(value) else '**not met**')} |")
    lines += ["", "## Checks", "", *[f"- {line}" for line in checks], "", "## Notes", "",
              "- Memory is a process's own RssAnon + RssShmem (bench/measure.py), sampled every 0.1 s; "
              "mmapped parent pages are page cache and not counted. Peaks are the largest over all reps. "
              "Warm totals include the Ray head's processes (GCS, raylet, dashboard, idle workers).",
              "- Other load: the largest, over the reps, average number of CPUs busy with processes this bench "
              "did not start (and kernel threads, e.g. writeback) during a run; before each run the bench waits "
              "(up to 5 min) for the machine to be nearly idle, and a run with other load above "
              f"{CONTENDED} CPUs is repeated (at most twice; the least contended attempt counts).",
              "- Every contender's run is preceded by an untimed full read of both parents, so all start with "
              "the parents in the page cache (a merge straight after a download reads them from disk: see "
              "docs/how-it-works.md on reading ahead). raymerge fsyncs its shards; "
              "the I/O floor fsyncs its file; mergekit does not fsync.",
              f"- The I/O floor writes {sum(map(os.path.getsize, weight_files(parents[0])))} bytes (parent A's "
              "weight files; the merged model's header differs by a few bytes).",
              f"- {mk_note}; command `{' '.join(['mergekit-yaml recipe.yml OUT', *MERGEKIT_FLAGS])}` (default CPU "
              "options) with a `models:` slerp recipe (base_model A, t 0.5, dtype bfloat16). mergekit reads the "
              "parents through a directory of symlinks whose config.json adds `architectures: [LlamaForCausalLM]`, "
              "which mergekit requires and the synthetic parents lack.",
              "- Warm runs attach to a `ray start --head --num-cpus=2` on 127.0.0.1 (token auth), started for each "
              "rep's warm contenders and stopped after them: no head runs during the other contenders (a live "
              "head slows an embedded Ray's start by 2-3 s on this machine). `--workers 1` gives its one actor "
              "both CPUs."]
    if scale2:
        lines.append("- Top processes of the scale-2 run: "
                     + "; ".join(f"{name.split(' ')[0]} {kb / MIB:.0f} MiB" for name, kb in scale2.top[:4]) + ".")
    return "\n".join(lines) + "\n"


def eval_text(work: str) -> str:
    """A held-out text for the --eval rows, in the benchmark tokenizer's own words."""
    import random

    r = random.Random(0)
    path = os.path.join(work, "heldout.txt")
    with open(path, "w") as f:
        f.write(" ".join(f"w{r.randrange(30000)}" for _ in range(EVAL_WORDS)))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--scale", type=int, default=1, help="parents' scale (2: twice the layers)")
    p.add_argument("--scale2", action="store_true", help="also one raymerge cold run on scale-2 parents")
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--no-7b", action="store_true", help="skip the 7B-shaped section (27 GB of parents)")
    p.add_argument("--7b-reps", dest="reps_7b", type=int, default=3)
    p.add_argument("--tiny-reps", type=int, default=5)
    p.add_argument("--worktree", action="store_true",
                   help="measure raymerge/ as it is in the working tree (default: git HEAD)")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--machine-note", default="",
                   help="what the Machine line adds that the bench cannot see (e.g. 'a disk shared with other machines')")
    args = p.parse_args()

    a, b = bench_parents(args.scale)
    mergekit, mk_note = (None, "mergekit skipped (--no-mergekit)") if args.no_mergekit else ensure_mergekit()
    print(mk_note, flush=True)
    work = tempfile.mkdtemp(prefix="raymerge-bench-work-", dir="/tmp")
    token = os.path.join(work, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    src, args.code = snapshot(work, args.worktree)
    print(f"measuring {args.code}", flush=True)
    # Ray puts the driver's working directory on its workers' sys.path, ahead of PYTHONPATH: run
    # everything from the work directory, so that nothing imports the live repository's raymerge/.
    os.chdir(work)
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    rm_env = {**plain_env, "PYTHONPATH": os.pathsep.join(filter(None, [src, plain_env.get("PYTHONPATH")]))}
    auth_env = {**rm_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token}
    cs = contenders(a, b, work, plain_env, rm_env, auth_env, mergekit, mk_note)
    checks = run_all(cs, args.reps, weight_files(a) + weight_files(b), lambda: start_head(work, auth_env))
    scale2 = None
    if args.scale2:
        a2, b2 = bench_parents(2)
        tmp = tempfile.mkdtemp(prefix="raymerge-bench-", dir="/tmp")
        read_fully(weight_files(a2) + weight_files(b2))
        wait_quiet()
        scale2 = measured([RAYMERGE, "merge", a2, b2, "-o", os.path.join(tmp, "child"), "-t", "0.5", "--quiet"],
                          rm_env)
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"scale 2: {scale2.wall_s:.1f} s, peak process {scale2.peak_process_kb / MIB:.0f} MiB", flush=True)
    read_fully(weight_files(a) + weight_files(b))
    split = split_table(a, b, args.reps, wait_quiet, rm_env) + [""] + reduction_table() + [""] + merge_table(args.reps)
    lines, targets = tiny_section(args.tiny_reps, rm_env, RAYMERGE, mergekit, work)
    wait_quiet()
    lines += ["", "## A search trial against one candidate paid otherwise", "", *search_section(env=rm_env)]
    lines += objectstore_section(args.reps, env=rm_env)
    if not args.no_7b:
        more, more_targets = seven_b_section(args.reps_7b, rm_env, RAYMERGE, mergekit, work)
        lines, targets = lines + more, targets + more_targets
    shutil.rmtree(work, ignore_errors=True)
    text = report(cs, checks, scale2, split, args, (a, b), mk_note, (lines, targets))
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
