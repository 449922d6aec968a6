"""Faults that really kill processes: an actor mid-merge, the driver mid-merge (then --resume),
a finished shard truncated by hand (then --resume). Each output must be byte-identical to an
undisturbed run."""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import raymerge
from raymerge.errors import InputError
from raymerge.schedule import Schedule
from raymerge.synthetic import build_parent, llama_config
from raynodes import freeze, merge_actor_pids, open_files

# Small row blocks make the merge of the medium parents take seconds, so a kill lands mid-merge.
# Shards of 10 MB: a dozen, each written whole by one actor, so that a test can see some finished
# while most are still to come.
MERGE = dict(t=0.5, workers=2, max_shard_size="10MB", block_bytes=256 * 1024)
# A resume may run with other blocks and another actor count (neither changes an output byte):
# the defaults, here one actor on the session's one-CPU head.
RESUME = dict(t=MERGE["t"], max_shard_size=MERGE["max_shard_size"], resume=True)


@pytest.fixture(scope="module")
def undisturbed(medium_parents, ray_head, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("faults") / "undisturbed")
    raymerge.merge(*medium_parents, out, **MERGE)
    return out


def same_shards(x: str, y: str) -> None:
    names = sorted(f for f in os.listdir(x) if f.endswith((".safetensors", ".index.json")))
    assert len(names) > 2
    assert names == sorted(f for f in os.listdir(y) if f.endswith((".safetensors", ".index.json")))
    for n in names:
        assert filecmp.cmp(os.path.join(x, n), os.path.join(y, n), shallow=False), n


def _wait_for(predicate, timeout=120.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def _partial_files(out: str) -> list[str]:
    """Shards in OUT without a completion record: being written, or left by an interrupted run."""
    if not os.path.isdir(out):
        return []
    done = os.path.join(out, ".raymerge", "done")
    return [f for f in os.listdir(out) if f.endswith(".safetensors")
            and not os.path.exists(os.path.join(done, f"{f}.json"))]


def _finished_shards(out: str) -> list[str]:
    """Shards with a completion record: kept by a resume."""
    done = os.path.join(out, ".raymerge", "done")
    return [f[:-len(".json")] for f in os.listdir(done) if f.endswith(".json")] if os.path.isdir(done) else []


def _open_partial_shards(pid: int, out: str) -> list[str]:
    """Shards the process holds open: an actor does only inside a ``write`` call."""
    return [path for path in open_files(pid, os.path.realpath(out)) if path.endswith(".safetensors")]


def test_actor_killed_mid_merge_is_replaced(medium_parents, ray_head, undisturbed, tmp_path):
    """An actor is frozen (SIGSTOP) while it holds a partial shard open, i.e. inside a write call,
    and killed (SIGKILL) in that state: Ray restarts it (one restart, a new process) and the
    merge completes byte-identical to an undisturbed run."""
    from ray.util.state import get_actor, list_actors

    out = str(tmp_path / "out")
    errors = []
    worker = threading.Thread(target=lambda: _capture(errors, raymerge.merge, *medium_parents, out, **MERGE))
    worker.start()
    victim = None

    def freeze_a_writer() -> bool:
        nonlocal victim
        for pid in merge_actor_pids(ray_head):
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            if _open_partial_shards(pid, out):
                victim = pid
                return True
            os.kill(pid, signal.SIGCONT)
        return False

    try:
        assert _wait_for(freeze_a_writer, step=0.02), "no actor was ever seen inside a write call"
        assert not os.path.exists(os.path.join(out, "config.json")), "the kill must land mid-merge"
        alive = list_actors(address=ray_head.address, filters=[("class_name", "=", "MergeActor"), ("state", "=", "ALIVE")],
                            detail=True)
        [actor] = [a for a in alive if a.pid == victim]
        assert actor.num_restarts == 0
    finally:
        if victim is not None:
            os.kill(victim, signal.SIGKILL)  # a stopped process dies of SIGKILL as it is
    worker.join(timeout=600)
    assert not worker.is_alive() and not errors, errors
    after = get_actor(actor.actor_id, address=ray_head.address)
    assert after.num_restarts == 1 and after.pid not in (None, 0, victim), after
    same_shards(out, undisturbed)


def _capture(errors, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception as e:  # reported by the test thread
        errors.append(e)


def _driver(parents, out, resume=False) -> list[str]:
    code = ("import sys, raymerge; raymerge.merge(sys.argv[1], sys.argv[2], sys.argv[3], resume=sys.argv[4] == '1', "
            f"address=sys.argv[5], **{MERGE!r})")
    return [sys.executable, "-c", code, *parents, out, "1" if resume else "0"]


def test_driver_killed_then_resumed(medium_parents, ray_head, undisturbed, tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.Popen([*_driver(medium_parents, out), ray_head.address], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: _finished_shards(out)), "no shard was finished"
        assert proc.poll() is None, "the kill must land mid-merge"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not os.path.exists(os.path.join(out, "config.json"))
    kept = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in _finished_shards(out)}
    raymerge.merge(*medium_parents, out, **RESUME)  # here, on the session's Ray
    same_shards(out, undisturbed)
    for f, mtime in kept.items():
        assert os.stat(os.path.join(out, f)).st_mtime_ns == mtime, f"{f} was finished and should have been kept"


def test_truncated_shard_is_redone_on_resume(medium_parents, ray_head, undisturbed, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(undisturbed, out)  # a finished merge of these parents and options
    shard = os.path.join(out, sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[1])
    os.truncate(shard, os.path.getsize(shard) // 2)
    raymerge.merge(*medium_parents, out, **RESUME)
    same_shards(out, undisturbed)


def test_resume_into_a_different_merge_is_refused(medium_parents, cli, undisturbed, tmp_path):
    proc = cli("merge", *medium_parents, "-o", undisturbed, "-t", "0.7", "--resume")
    assert proc.returncode == 1
    assert proc.stderr == (f"raymerge: error: output {os.path.realpath(undisturbed)} holds a different merge (other "
                           "parents, t or options): refusing to resume into it\n"), proc.stderr


@pytest.fixture(scope="module")
def tiny_done(tiny_parents, ray_head, session_dir, tmp_path_factory):
    """A finished merge of the tiny parents at t=0.3, and a third parent C of their shape."""
    out = str(tmp_path_factory.mktemp("resume") / "done")
    raymerge.merge(*tiny_parents, out, t=0.3)
    c = build_parent(str(session_dir / "parent-c"), llama_config(vocab_size=1000), seed=3,
                     base=(llama_config(vocab_size=1000), 1))
    return out, c


# What a resume into the t=0.3 merge of (A, B) changes: each must be refused before any work.
OTHER_MERGES = {
    "other-parent-b": lambda a, b, c: ((a, c), {}),
    "parents-swapped": lambda a, b, c: ((b, a), {}),
    "t": lambda a, b, c: ((a, b), {"t": 0.7}),
    "dtype": lambda a, b, c: ((a, b), {"dtype": "float32"}),
    "max-shard-size": lambda a, b, c: ((a, b), {"max_shard_size": "100KB"}),
    "pad": lambda a, b, c: ((a, b), {"pad": "zeros"}),
    "tokenizer-from": lambda a, b, c: ((a, b), {"tokenizer_from": "b"}),
    "schedule": lambda a, b, c: ((a, b), {"t": (), "schedule": Schedule(default=(0.5,), filters=(("mlp", (0.3,)),))}),
}


@pytest.mark.parametrize("change", list(OTHER_MERGES))
def test_resume_refuses_other_parents_dtype_and_options(tiny_parents, tiny_done, tmp_path, change):
    done, c = tiny_done
    out = str(tmp_path / "out")
    shutil.copytree(done, out)
    before = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    parents, options = OTHER_MERGES[change](*tiny_parents, c)
    options = {"t": 0.3, **options}
    # Swapped parents: the shards of SLERP(A, B, 0.3) are not the merge of (B, A) at t=0.3.
    with pytest.raises(InputError, match="holds a different merge"):
        raymerge.merge(*parents, out, resume=True, **options)
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)} == before, "nothing was touched"


def test_resume_with_the_same_merge_is_accepted(tiny_parents, tiny_done, tmp_path):
    """The control for the refusals above: the same parents and options resume (nothing to redo)."""
    done, _ = tiny_done
    out = str(tmp_path / "out")
    shutil.copytree(done, out)
    shard = os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns
    raymerge.merge(*tiny_parents, out, t=0.3, resume=True)
    assert os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns == shard, "the finished shard is kept"
    assert filecmp.cmp(os.path.join(out, "model.safetensors"), os.path.join(done, "model.safetensors"), shallow=False)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_cleans_up_and_resumes(medium_parents, ray_head, cli, undisturbed, tmp_path, signum):
    """Ctrl-C, or SIGTERM as `ray job stop` sends it, mid-merge: exit 130, no partial shards, no
    config.json, and --resume completes byte-identical to an undisturbed run."""
    out = str(tmp_path / "out")
    # The command as a terminal starts it: with Ctrl-C's default (a shell without job control
    # starts a background pipeline, as pytest may be, with SIGINT ignored, which Python keeps).
    terminal = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "from raymerge.cli import entry; entry()")
    options = ["merge", *medium_parents, "-o", out, "-t", "0.5", "--max-shard-size", "10MB",
               "--address", ray_head.address]
    # Small blocks (which never change an output byte) stretch the merge phase, so that the
    # interrupt after the first finished shard lands mid-merge even on a busy machine.
    cmd = [sys.executable, "-c", terminal, *options, "--workers", "2", "--block-size", "16KiB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def frozen_mid_merge() -> bool:
        """The driver stopped (SIGSTOP) while some shard is finished and another is not: it cannot
        leave the merge until it runs again (on a busy machine, the merge could otherwise end
        between a look at OUT and the signal). Let go at once if the look comes too late."""
        return bool(_finished_shards(out) and _partial_files(out)) and freeze(proc.pid, lambda: _partial_files(out))

    assert _wait_for(frozen_mid_merge, step=0.01), "no shard was finished while others were written"
    assert proc.poll() is None, "the interrupt must land mid-merge"
    proc.send_signal(signum)  # taken when the driver runs again, inside the merge
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    # Ray's core worker installs its own SIGTERM handler (exit 15, partial shards left): the
    # driver puts raymerge's back after ray.init.
    assert proc.returncode == 130, (proc.returncode, _partial_files(out), err)
    assert err.splitlines()[-1] == "raymerge: interrupted; finished shards are kept: rerun with --resume to continue"
    assert _partial_files(out) == [], "partial shards are removed"
    assert not os.path.exists(os.path.join(out, "config.json"))
    kept = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in _finished_shards(out)}
    assert kept and sorted(kept) == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    # The interrupted merge's own command line, resumed in this process (on the session's Ray),
    # with the default blocks and actor count: neither changes a byte, so a resume may change them.
    again = cli(*options, "--resume", "--quiet")
    assert again.returncode == 0, again.stderr
    same_shards(out, undisturbed)
    for f, mtime in kept.items():
        assert os.stat(os.path.join(out, f)).st_mtime_ns == mtime, f"{f} was finished and should have been kept"
