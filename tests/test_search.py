"""`raymerge search` end to end on the tiny parents, in this process on the session's Ray: its
table, its best row and what it wrote, checked against independent computations; and the bad
inputs it refuses in one line before any work."""

from __future__ import annotations

import io
import os
import pickle
import random
import signal
import subprocess
import sys
from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest

from raymerge.holdout import DEV_PIECES, split_text
from raymerge.recipe import load_recipe
from raymerge.report import plot_search
from raymerge.search import print_summary
from raymerge.search_space import SEEDED_T, SearchSpace
from raynodes import RayNode, worker_pids
from reference import plain_bits

CONTEXT = 32
TRIALS = 16


@pytest.fixture(scope="module")
def text(session_dir):
    rng = random.Random(2)
    path = session_dir / "search.txt"
    path.write_text(" ".join(f"w{rng.randrange(900)}" for _ in range(600)) + "\n")
    return path


@dataclass
class FirstRun:
    """The search's first run, killed: the trial lines it printed and its trial processes."""
    ended: list[str]
    pids: set[int]


@pytest.fixture(scope="module")
def searched(tiny_parents, text, ray_head, session_dir):
    """A 16-trial search, run as a user whose first run died runs it: ``raymerge search`` killed
    (SIGKILL) once three trials ended, then ``--resume`` (here through the Python API, which
    returns the result). One trial at a time, so that trials end in order."""
    from raymerge.cli import build_options
    from raymerge.search import SearchOptions, run_search

    out = session_dir / "search-out"
    cmd = [sys.executable, "-m", "raymerge.cli", "search", *map(str, tiny_parents), "-o", str(out), "--eval", str(text),
           "--context", str(CONTEXT), "--trials", str(TRIALS), "--parallel", "1", "--seed", "3",
           "--address", ray_head.address]
    # Tune saves its experiment state at every step instead of every 10 s or more (its own knob).
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0"})
    killed = FirstRun([], set())
    try:
        for line in first.stderr:
            if line.startswith("search: trial "):
                killed.ended.append(line)
                killed.pids |= set(worker_pids("ImplicitFunc", ray_head))  # Tune's trial processes
                if len(killed.ended) == 3:
                    break
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert len(killed.ended) == 3, "the first run ended three trials before it was killed"
    assert not (out / "search.parquet").exists()
    options = build_options(a=tiny_parents[0], b=tiny_parents[1], out=str(out), eval_text=str(text), context=CONTEXT,
                            quiet=True, resume=True)
    result = run_search(SearchOptions(options, trials=TRIALS, parallel=1, seed=3))
    return out, pq.read_table(out / "search.parquet").to_pylist(), result, killed


def test_the_table_has_every_trial_the_constants_first_and_names_the_best(searched, tmp_path):
    out, rows, _, _ = searched
    space = SearchSpace()
    assert len(rows) == TRIALS
    constants = sorted(r["default.0"] for r in rows if r["seeded_constant"])
    assert constants == list(SEEDED_T)
    for r in rows:
        assert set(space.names()) <= set(r)
        assert all(0.0 <= r[n] <= 1.0 for n in space.names())
        assert r["pid"] and r["node"] and r["seconds"] > 0
    finished = [r for r in rows if not r["stopped_early"]]
    stopped = [r for r in rows if r["stopped_early"]]
    assert stopped, "the scheduler stopped some trials early"
    assert all(r["test_bits_per_byte"] is None for r in stopped)
    assert max(r["dev_windows"] for r in stopped) < min(r["dev_windows"] for r in finished)
    best = min(finished, key=lambda r: r["dev_bits_per_byte"])
    curve = plot_search(pq.read_table(out / "search.parquet"), SearchSpace().schedule({n: best[n] for n in space.names()}),
                        2, str(tmp_path / "again.png"))
    assert curve[-1] == best["dev_bits_per_byte"] and curve == sorted(curve, reverse=True)
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_recipe(str(out / "recipe.yml")).schedule == space.schedule({n: best[n] for n in space.names()})


def test_best_is_its_recipe_and_scores_as_the_table_says(searched, tiny_parents, text, cli, tmp_path):
    out, rows, _, _ = searched
    again = tmp_path / "again"
    assert cli("run", out / "recipe.yml", "-o", again, "--quiet").returncode == 0
    shards = sorted(f for f in os.listdir(out / "best") if f.endswith(".safetensors"))
    assert shards and all((out / "best" / f).read_bytes() == (again / f).read_bytes() for f in shards)
    # The best row's dev and test scores, recomputed from the written child with plain transformers.
    best = min((r for r in rows if not r["stopped_early"]), key=lambda r: r["dev_bits_per_byte"])
    whole = text.read_text()
    for pieces in range(DEV_PIECES, 0, -1):  # as many dev pieces as the search had
        split = split_text(whole, 0.3, pieces)
        if len(split.dev) == pieces:
            break
    dev = sum(plain_bits(str(out / "best"), p, CONTEXT) for p in split.dev) / len("".join(split.dev).encode())
    test = plain_bits(str(out / "best"), split.test, CONTEXT) / len(split.test.encode())
    assert best["dev_bits_per_byte"] == pytest.approx(dev, rel=1e-9)
    assert best["test_bits_per_byte"] == pytest.approx(test, rel=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "--trials 0: a search needs at least one trial"),
    (["--anchors", "0"], "--anchors 0: a gradient needs at least one anchor"),
    (["--filter", "no_such_module"], "--filter 'no_such_module' matches no tensor"),
    (["--context", "2048"], "too short for one dev and one test window"),
])
def test_bad_input_is_one_line_before_any_work(tiny_parents, text, cli, tmp_path, args, message):
    out = tmp_path / "out"
    result = cli("search", *tiny_parents, "-o", out, "--eval", text, *args)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("raymerge: error: "), result.stderr
    assert message in result.stderr, result.stderr
    assert not out.exists()


def test_an_output_in_a_bucket_is_refused(tiny_parents, text, cli):
    result = cli("search", *tiny_parents, "-o", "s3://bucket/searched", "--eval", text)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("raymerge: error: s3://bucket/searched: a search writes its OUT on a filesystem")


def test_an_output_that_is_not_empty_is_refused(tiny_parents, text, cli, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = cli("search", *tiny_parents, "-o", tmp_path / "out", "--eval", text)
    assert result.returncode == 1
    assert result.stderr == (f"raymerge: error: {tmp_path / 'out'} is not empty: a search writes into a new or empty "
                             "directory (--resume continues the search it holds)\n")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_the_parents_score_as_the_constants_that_reproduce_them(searched):
    """t = 0 reproduces parent A byte for byte (the same vocabulary here): its trial, always the
    first and never stopped, scores exactly as A loaded from its directory."""
    _, rows, result, _ = searched
    t0 = next(r for r in rows if r["seeded_constant"] and r["default.0"] == 0.0)
    assert not t0["stopped_early"]
    assert result.parents["A"] == pytest.approx((t0["dev_bits_per_byte"], t0["test_bits_per_byte"]), rel=1e-12)
    assert set(result.parents) == {"A", "B"} and all(v > 0 for pair in result.parents.values() for v in pair)


def test_the_summary_names_the_best_the_parents_the_best_constant_and_the_files(searched):
    """What the command line prints after a search (its options are the bad-input tests' above)."""
    out, rows, result, _ = searched
    stream = io.StringIO()
    print_summary(result, stream)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith(f"searched {TRIALS} trials in ")
    best = min((r for r in rows if not r["stopped_early"]), key=lambda r: r["dev_bits_per_byte"])
    assert lines[1] == (f"  best schedule: dev {best['dev_bits_per_byte']:.4f}, "
                        f"test {best['test_bits_per_byte']:.4f} bits/byte")
    assert lines[2].startswith("  parent A: dev ") and lines[3].startswith("  parent B: dev ")
    assert lines[4].startswith("  best constant t=")
    assert sorted(os.listdir(out)) == [".raymerge", "best", "recipe.yml", "search.parquet", "search.png"]
    assert all(os.path.join(str(out), name) in lines[5] for name in ("best", "recipe.yml", "search.parquet", "search.png"))



def test_the_resume_kept_the_ended_trials_and_ran_only_the_others(searched, tiny_parents, text, cli):
    """The fixture's search was killed after three trials ended: the trials Tune's experiment
    state recorded as ended keep their rows from the first run's processes, and the resume ran
    only the others (a resume that started over would keep none; one that ran ended trials again
    would have more rows). A resume with other options is refused in one line."""
    out, rows, _, killed = searched
    assert len(rows) == TRIALS and len({r["trial"] for r in rows}) == TRIALS
    kept = [r for r in rows if r["pid"] in killed.pids]
    assert 2 <= len(kept) <= 4, kept  # those ended before the kill, as far as Tune's state had them
    printed = {line.split("dev ")[1].split(" ")[0] for line in killed.ended}
    assert {f"{r['dev_bits_per_byte']:.4f}" for r in kept} <= printed
    other = cli("search", *tiny_parents, "-o", out, "--eval", text, "--context", CONTEXT, "--trials", TRIALS + 1,
                "--parallel", 1, "--seed", 3, "--resume")
    assert other.returncode == 1
    assert other.stderr == f"raymerge: error: {out} holds a search with other trials: refusing to resume it\n"

@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A Ray cluster of two nodes of one CPU each: one scoring actor fits on each."""
    logs = tmp_path_factory.mktemp("two-nodes")
    head = RayNode(str(logs / "head.log"), num_cpus=1, dashboard=False)
    nodes = [head]
    try:
        head.wait_ready()
        nodes.append(RayNode(str(logs / "worker.log"), head=False, address=head.address, num_cpus=1))
        nodes[1].wait_ready()
        yield head
    finally:
        for node in reversed(nodes):
            node.stop()


def test_parallel_trials_overlap_on_both_nodes(tiny_parents, text, two_nodes, attach, cli, tmp_path):
    """``--parallel 2`` on two one-CPU nodes: trials run on both nodes at once."""
    out = tmp_path / "out"
    with attach(two_nodes):
        done = cli("search", *tiny_parents, "-o", out, "--eval", text, "--context", CONTEXT, "--trials", 2,
                   "--parallel", 2, "--address", two_nodes.address, "--quiet")
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(out / "search.parquet").to_pylist()
    assert len({r["node"] for r in rows}) == 2, "trials ran on both nodes"
    assert any(r["node"] != s["node"] and r["started"] < s["started"] + s["seconds"] and
               s["started"] < r["started"] + r["seconds"] for r in rows for s in rows), \
        [(r["node"][:8], r["started"], r["seconds"]) for r in rows]


def test_a_record_write_killed_midway_leaves_the_last_whole_one(tmp_path):
    """Tune rewrites its records in place at every checkpoint; a search killed mid-copy left one
    cut short, and --resume failed on it (Tune: "Failed to restore the run state", then a
    traceback). Through the search's filesystem, a process killed (os._exit) halfway through
    rewriting a record leaves the last whole one, and a temporary file no name of Tune's matches."""
    state = tmp_path / "experiment_state-2026.json"
    state.write_text('{"trial_data": []}')
    code = ("import os, sys; from raymerge.tune_files import whole_files\n"
            "f = whole_files().open_output_stream(sys.argv[1]); f.write(b'{\"trial_da'); f.flush(); os._exit(9)")
    killed = subprocess.run([sys.executable, "-c", code, str(state)], capture_output=True, text=True, timeout=60)
    assert killed.returncode == 9, killed.stderr
    assert state.read_text() == '{"trial_data": []}'
    [left] = [p.name for p in tmp_path.iterdir() if p != state]
    assert left.startswith(state.name + ".") and left.endswith(".partial")


@pytest.mark.parametrize("name, cut", [("experiment_state-2026.json", b'{"trial_da'),
                                       ("searcher-state-2026.pkl", pickle.dumps({"space": [0.5] * 64})[:-9])])
def test_a_record_copied_while_tune_rewrote_it_is_not_put_in_place(tmp_path, name, cut):
    """Tune copies a record from its staging file on a thread while its next save may be
    rewriting that file (seen: an empty experiment state after a kill, then a failed resume). A
    record that does not read back is dropped, and the last whole one stays."""
    from raymerge.tune_files import whole_files

    record = tmp_path / name
    whole = b'{"trial_data": []}' if name.endswith(".json") else pickle.dumps({"space": []})
    record.write_bytes(whole)
    with whole_files().open_output_stream(str(record)) as f:
        f.write(cut)
    assert record.read_bytes() == whole and os.listdir(tmp_path) == [name]
    with whole_files().open_output_stream(str(record)) as f:
        f.write(b'{"trial_data": [1]}' if name.endswith(".json") else pickle.dumps({"space": [1]}))
    assert record.read_bytes() != whole, "a whole record replaces the last one"


def test_actors_the_search_waits_for_wait_at_most_the_schedule_timeout(tiny_parents, text, ray_head, cli, tmp_path):
    """The search's own actors are placed as a merge's are: on a cluster whose CPU stays taken,
    the first pass's merge actors, and the actor scoring the parents after the trials, stop the
    search in one line after --schedule-timeout (both waited without end before)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from raymerge import pool
    from raymerge.cli import build_options
    from raymerge.errors import InputError
    from raymerge.parents import load_parent
    from raymerge.placement import live_nodes, scoring_shape
    from raymerge.search import _score_parents

    refusal = "1 of 1 actor(s) were not scheduled within 2 s; the cluster has 1 CPUs and 0 GPUs on 1 node(s)"
    options = build_options(a=tiny_parents[0], b=tiny_parents[1], out="unused", eval_text=str(text), context=CONTEXT,
                            quiet=True, schedule_timeout=2)
    a, b = load_parent(options.a, "A"), load_parent(options.b, "B")
    shape = scoring_shape(live_nodes(), 1, 0)
    assert shape.num_cpus == 1, "the session's head has one CPU"
    pool.release_idle()  # merge actors this process kept from an earlier test
    taken = placement_group([{"CPU": 1}])  # the head's one CPU, reserved
    try:
        ray.get(taken.ready(), timeout=60)
        search = cli("search", *tiny_parents, "-o", tmp_path / "out", "--eval", text, "--context", CONTEXT,
                     "--trials", 2, "--schedule-timeout", 2, "--quiet")
        with pytest.raises(InputError) as scoring:
            _score_parents(a, b, text.read_text(), CONTEXT, 0.3, 1, shape, options)
    finally:
        remove_placement_group(taken)
    assert (search.returncode, search.stderr) == (1, f"raymerge: error: {refusal}\n")
    assert str(scoring.value) == refusal
