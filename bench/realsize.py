"""Merges at real size, from storage, and merges of tiny parents from prompt to prompt.

    .venv/bin/python bench/realsize.py [--reps 3] [--tiny-reps 5]     # prints two Markdown sections

bench/bench.py calls the two functions here; run alone, this measures the working tree.

**7B-shaped pair, parents evicted.** The Llama-2-7B-shaped parents of bench/parents.py (13.5 GB of
bf16 each: together more than a small machine's memory). Before every run the output of the last
one is deleted, dirty pages are synced, and both parents are evicted from the page cache
(``posix_fadvise(DONTNEED)``), so each contender reads them from storage. Contenders, round-robin:
the cold I/O floor (bench/iofloor.py: read both parents once, write and fsync one model), raymerge
(``raymerge merge A B -o OUT -t 0.5``, embedded Ray) and mergekit followed by a ``sync`` of its
output. Reported: wall, bytes read from storage during the run (``pgpgin`` of /proc/vmstat: the
whole machine, so a quiet machine is assumed; the bench waits for one), peak own memory of the
largest process. Before anything is written the disk's free space is checked.

**Tiny parents, prompt to prompt.** The test fixtures' size (two 4-layer Llamas, hidden 64, vocab
1000). raymerge as users install it (``pip install .``: plain ``ray``, in a virtualenv of its own
kept in the bench cache) and, for comparison, with the test extras (``ray[default]``, this
checkout's .venv), against mergekit; each from the shell's point of view: interpreter start,
imports, Ray start and stop, the merge, exit. One more row starts and stops raymerge's embedded
Ray the way a merge does (``RaySession``, in the plain virtualenv) and does nothing else: no
merge with an embedded Ray can take less than that on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests")]

from mergekit_recipe import MERGEKIT_FLAGS, ensure_mergekit, mergekit_view, write_recipe  # noqa: E402
from parents import CACHE, SEVEN_B_BYTES, seven_b_built, seven_b_parents  # noqa: E402
from tracked import Run, measured, wait_quiet  # noqa: E402

MIB = 1024
PLAIN_VENV = os.path.join(CACHE, "plain-venv")  # raymerge as `pip install .` installs it
# An embedded Ray started and stopped as a merge does it, and nothing else.
RAY_ALONE = "from raymerge.session import RaySession; s = RaySession().start(); s.wait(); s.stop()"
RAY_ALONE_ROW = "embedded Ray alone (start, stop; no merge)"


def weight_files(model_dir: str) -> list[str]:
    return sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".safetensors"))


def evict(files: list[str]) -> None:
    """Drop the files' pages from the page cache (they are clean: parents are only read)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def storage_read_bytes() -> int:
    """Bytes read from block devices since boot, by the whole machine (/proc/vmstat pgpgin, KiB)."""
    with open("/proc/vmstat") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("pgpgin ")) * 1024


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def seven_b_section(reps: int, env: dict[str, str], raymerge: str, mergekit: str | None,
                    work: str) -> tuple[list[str], list[tuple]]:
    """Markdown lines of the 7B-shaped section (or why it was skipped), and its targets as
    (label, value, test, unit)."""
    out_bytes = SEVEN_B_BYTES // 2
    need = out_bytes + 2 * 10**9 + (0 if seven_b_built() else SEVEN_B_BYTES)
    room = free_bytes(CACHE if os.path.isdir(CACHE) else os.path.dirname(CACHE))
    tmp_room = free_bytes("/tmp")
    title = ["## Merges at real size: a 7B-shaped pair, parents evicted", ""]
    if room < need or tmp_room < out_bytes + 2 * 10**9:
        msg = (f"skipped: it needs {need / 1e9:.0f} GB free for the parents and one output "
               f"({room / 1e9:.0f} GB free in {CACHE}, {tmp_room / 1e9:.0f} GB in /tmp)")
        print(f"7B section {msg}", flush=True)
        return title + [f"The 7B section was {msg}.", ""], []
    a, b = seven_b_parents()
    files = weight_files(a) + weight_files(b)
    parent_bytes = sum(map(os.path.getsize, files))
    floor = [sys.executable, os.path.join(HERE, "iofloor.py")]
    contenders = {
        "cold I/O floor (read both, write + fsync one)": lambda o: floor + [o, str(out_bytes), *files],
        "raymerge, embedded Ray": lambda o: [raymerge, "merge", a, b, "-o", o, "-t", "0.5", "--quiet"],
    }
    if mergekit:
        recipe = write_recipe(os.path.join(work, "recipe-7b.yml"), mergekit_view(a, os.path.join(work, "mk7-a")),
                              mergekit_view(b, os.path.join(work, "mk7-b")))
        contenders["mergekit 0.1.5, then sync"] = lambda o: ["sh", "-c", '"$0" "$@" && sync "$2"/*.safetensors',
                                                              mergekit, recipe, o, *MERGEKIT_FLAGS]
    runs: dict[str, list[tuple[Run, int]]] = {name: [] for name in contenders}
    names = list(contenders)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            tmp = tempfile.mkdtemp(prefix="raymerge-bench-7b-", dir="/tmp")
            out = os.path.join(tmp, "model.safetensors" if "floor" in name else "child")
            os.sync()
            evict(files)
            wait_quiet()
            before = storage_read_bytes()
            run = measured(contenders[name](out), env)
            read = storage_read_bytes() - before
            shutil.rmtree(tmp, ignore_errors=True)
            runs[name].append((run, read))
            print(f"7B rep {rep + 1}/{reps}  {name:46s} {run.wall_s:7.1f} s  {'ok' if run.ok else 'FAILED'}  "
                  f"read {read / 1e9:6.2f} GB  peak process {run.peak_process_kb / MIB:5.0f} MiB  "
                  f"phases {run.phases}", flush=True)
    med = {n: _median([r.wall_s for r, _ in rs if r.ok]) for n, rs in runs.items()}
    floor_s = med[names[0]]
    mk_s = med.get("mergekit 0.1.5, then sync")
    rows = []
    for name, rs in runs.items():
        ok = [r for r, _ in rs if r.ok]
        read = _median([x for r, x in rs if r.ok])
        peak = max((r.peak_process_kb / MIB for r in ok), default=None)
        rows.append(f"| {name} | {fmt(med[name])} | {fmt(min((r.wall_s for r in ok), default=None))} / "
                    f"{fmt(max((r.wall_s for r in ok), default=None))} | {len(ok)}/{len(rs)} | "
                    f"{fmt(read and read / 1e9, '.1f')} ({fmt(read and read / parent_bytes, '.2f', '×')}) | "
                    f"{fmt(med[name] and floor_s and med[name] / floor_s, '.2f', '×')} | "
                    f"{fmt(med[name] and mk_s and med[name] / mk_s, '.2f', '×')} | {fmt(peak, '.0f')} |")
    rm = [r for r, _ in runs["raymerge, embedded Ray"] if r.ok and r.phases]
    phases = ""
    if rm:
        keys = list(rm[0].phases)
        phases = "raymerge's own phases (medians): " + ", ".join(
            f"{k} {statistics.median(r.phases.get(k, 0.0) for r in rm):.1f} s" for k in keys) + "."
    rm_runs = runs["raymerge, embedded Ray"]
    rm_s = med["raymerge, embedded Ray"]
    rm_read = _median([x for r, x in rm_runs if r.ok])
    rm_peak = max((r.peak_process_kb / MIB for r, _ in rm_runs if r.ok), default=None)
    targets = [
        ("7B: bytes read from storage ≤ 1.05× the parents", rm_read and rm_read / parent_bytes, lambda v: v <= 1.05, "×"),
        ("7B: raymerge ≤ 1.2× the cold I/O floor", rm_s and floor_s and rm_s / floor_s, lambda v: v <= 1.2, "×"),
        ("7B: raymerge ≤ 0.6× mergekit + sync", rm_s and mk_s and rm_s / mk_s, lambda v: v <= 0.6, "×"),
        ("7B: no raymerge process > 1.5 GB (1431 MiB)", rm_peak, lambda v: v <= 1.5e9 / 2**20, " MiB"),
    ]
    return title + [
        f"Parents: `{a}` and `{b}` (bench/parents.py --7b: hidden 4096, 32 layers, intermediate 11008, "
        f"vocab 32000; {parent_bytes / 1e9:.1f} GB of bf16 together). Before every run: the last output "
        "deleted, `sync`, both parents evicted from the page cache. "
        f"{reps} reps, round-robin; medians. Single t = 0.5.", "",
        "| contender | median wall s | min / max s | ok runs | read from storage GB (× parents) | × cold I/O floor | "
        "× mergekit + sync | peak process MiB |",
        "|---|---|---|---|---|---|---|---|", *rows, "", phases, ""], targets


def ensure_plain_venv(log: str) -> str | None:
    """A virtualenv with raymerge installed as users install it (``pip install .``, no extras);
    built once in the bench cache. Returns its python, or None (with the reason in ``log``)."""
    python = os.path.join(PLAIN_VENV, "bin", "python")
    stamp = os.path.join(PLAIN_VENV, ".installed")
    if os.path.exists(stamp):
        return python
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "venv", PLAIN_VENV], stdout=f, stderr=f).returncode
        rc = rc or subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                   "-c", os.path.join(ROOT, "constraints.txt"), ROOT], stdout=f, stderr=f).returncode
    if rc:
        return None
    open(stamp, "w").close()
    return python


def tiny_section(reps: int, env: dict[str, str], raymerge_extras: str, mergekit: str | None,
                 work: str) -> tuple[list[str], list[tuple]]:
    """Markdown lines of the tiny-parents section (prompt to prompt, medians) and its target."""
    from raymerge.synthetic import build_parent, llama_config

    root = os.path.join(CACHE, "tiny")
    cfg = llama_config(vocab_size=1000)
    a, b = os.path.join(root, "parent-a"), os.path.join(root, "parent-b")
    for path, kw in ((a, {"seed": 1}), (b, {"seed": 2, "base": (cfg, 1)})):
        if not os.path.isfile(os.path.join(path, "config.json")):
            build_parent(path, cfg, **kw)
    plain_python = ensure_plain_venv(os.path.join(CACHE, "plain-venv-install.log"))
    contenders = {}
    if plain_python:
        plain = os.path.join(os.path.dirname(plain_python), "raymerge")
        contenders["raymerge, `pip install .` (ray)"] = lambda o: [plain, "merge", a, b, "-o", o, "-t", "0.5", "--quiet"]
        contenders[RAY_ALONE_ROW] = lambda o: [plain_python, "-c", RAY_ALONE]
    contenders["raymerge, test extras (ray[default])"] = lambda o: [raymerge_extras, "merge", a, b, "-o", o,
                                                                     "-t", "0.5", "--quiet"]
    if mergekit:
        recipe = write_recipe(os.path.join(work, "recipe-tiny.yml"), a, b)
        contenders["mergekit 0.1.5"] = lambda o: [mergekit, recipe, o, *MERGEKIT_FLAGS]
    runs: dict[str, list[Run]] = {n: [] for n in contenders}
    names = list(contenders)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            tmp = tempfile.mkdtemp(prefix="raymerge-bench-tiny-", dir="/tmp")
            wait_quiet()
            run = measured(contenders[name](os.path.join(tmp, "child")), env)
            shutil.rmtree(tmp, ignore_errors=True)
            runs[name].append(run)
            print(f"tiny rep {rep + 1}/{reps}  {name:40s} {run.wall_s:5.2f} s  {'ok' if run.ok else 'FAILED'}  "
                  f"phases {run.phases}", flush=True)
    med = {n: _median([r.wall_s for r in rs if r.ok]) for n, rs in runs.items()}
    mk = med.get("mergekit 0.1.5")
    rows = []
    for name, rs in runs.items():
        ok = [r for r in rs if r.ok]
        phases = ""
        if ok and ok[0].phases:
            phases = ", ".join(f"{k} {statistics.median(r.phases.get(k, 0.0) for r in ok):.2f}" for k in ok[0].phases)
            phases += f", outside {statistics.median(r.wall_s - sum(r.phases.values()) for r in ok):.2f}"
        rows.append(f"| {name} | {fmt(med[name], '.2f')} | {fmt(min((r.wall_s for r in ok), default=None), '.2f')} / "
                    f"{fmt(max((r.wall_s for r in ok), default=None), '.2f')} | {len(ok)}/{len(rs)} | "
                    f"{fmt(med[name] and mk and med[name] / mk, '.2f', '×')} | {phases} |")
    plain_s = med.get("raymerge, `pip install .` (ray)")
    targets = [("tiny parents: raymerge (`pip install .`) ≤ 0.6× mergekit", plain_s and mk and plain_s / mk,
                lambda v: v <= 0.6, "×")]
    return ["## Tiny parents, prompt to prompt", "",
            "The test fixtures' size (two 4-layer Llamas, hidden 64, vocab 1000; 0.6 MB each), in page cache. "
            "Each command timed from its start to its exit: interpreter, imports, Ray start and stop (embedded), "
            f"the merge, exit. {reps} reps, round-robin; medians. \"{RAY_ALONE_ROW}\" starts and stops raymerge's "
            "embedded Ray as a merge does and does nothing else: a lower bound for any embedded-Ray merge here.", "",
            "| contender | median wall s | min / max s | ok runs | × mergekit | raymerge's phases (s) |",
            "|---|---|---|---|---|---|", *rows, ""], targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny-reps", type=int, default=5)
    p.add_argument("--no-7b", action="store_true")
    args = p.parse_args()
    mergekit, note = ensure_mergekit()
    print(note, flush=True)
    work = tempfile.mkdtemp(prefix="raymerge-bench-work-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    # Both raymerge installs run this working tree's code (the plain venv holds a copy from when it
    # was built).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    raymerge = os.path.join(os.path.dirname(sys.executable), "raymerge")
    try:
        lines, _ = tiny_section(args.tiny_reps, env, raymerge, mergekit, work)
        if not args.no_7b:
            lines += seven_b_section(args.reps, env, raymerge, mergekit, work)[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
