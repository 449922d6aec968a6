"""Faults that really kill processes: an actor mid-merge, the driver mid-merge (then --resume),
a finished shard truncated by hand (then --resume). Each output must be byte-identical to an
undisturbed run."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import raymerge
from raymerge.synthetic import build_parent, llama_config
from raynodes import descendants

# Small row blocks make the merge of the medium parents take seconds, so a kill lands mid-merge.
MERGE = dict(t=0.5, workers=2, max_shard_size="20MB", block_bytes=256 * 1024)


@pytest.fixture(scope="module")
def medium_parents(session_dir):
    cfg = llama_config(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8)
    root = session_dir / "medium"
    return (build_parent(str(root / "a"), cfg, seed=41),
            build_parent(str(root / "b"), cfg, seed=42, base=(cfg, 41)))


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
    root = os.path.join(out, ".raymerge", "partial")
    return [f for _, _, files in os.walk(root) for f in files] if os.path.isdir(root) else []


def _merge_actor_pids(head) -> list[int]:
    pids = []
    for pid in descendants(head.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::MergeActor"):
                    pids.append(pid)
        except OSError:
            pass
    return pids


def test_actor_killed_mid_merge_is_replaced(medium_parents, ray_head, undisturbed, tmp_path):
    out = str(tmp_path / "out")
    errors = []
    worker = threading.Thread(target=lambda: _capture(errors, raymerge.merge, *medium_parents, out, **MERGE))
    worker.start()
    assert _wait_for(lambda: _partial_files(out)), "pass 2 never started"
    victims = _merge_actor_pids(ray_head)
    assert victims and not os.path.exists(os.path.join(out, "config.json")), "the kill must land mid-merge"
    os.kill(victims[0], signal.SIGKILL)
    worker.join(timeout=600)
    assert not errors, errors
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
        finished = lambda: any(f.endswith(".safetensors") for f in os.listdir(out)) if os.path.isdir(out) else False
        assert _wait_for(finished), "no shard was finished"
        assert proc.poll() is None, "the kill must land mid-merge"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not os.path.exists(os.path.join(out, "config.json"))
    kept = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out) if f.endswith(".safetensors")}
    again = subprocess.run([*_driver(medium_parents, out, resume=True), ray_head.address],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    same_shards(out, undisturbed)
    for f, mtime in kept.items():
        assert os.stat(os.path.join(out, f)).st_mtime_ns == mtime, f"{f} was finished and should have been kept"


def test_truncated_shard_is_redone_on_resume(medium_parents, ray_head, undisturbed, tmp_path):
    out = str(tmp_path / "out")
    raymerge.merge(*medium_parents, out, **MERGE)
    shard = os.path.join(out, sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[1])
    os.truncate(shard, os.path.getsize(shard) // 2)
    raymerge.merge(*medium_parents, out, resume=True, **MERGE)
    same_shards(out, undisturbed)


def test_resume_into_a_different_merge_is_refused(medium_parents, ray_head, undisturbed, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raymerge.cli", "merge", *medium_parents, "-o", undisturbed,
                           "-t", "0.7", "--resume", "--address", ray_head.address], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "holds a different merge" in proc.stderr


def test_ctrl_c_stops_cleans_up_and_resumes(medium_parents, ray_head, undisturbed, tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "raymerge.cli", "merge", *medium_parents, "-o", out, "-t", "0.5",
           "--workers", "2", "--max-shard-size", "20MB", "--block-size", "256KiB", "--address", ray_head.address]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finished = lambda: any(f.endswith(".safetensors") for f in os.listdir(out)) if os.path.isdir(out) else False
    assert _wait_for(finished), "no shard was finished"
    assert proc.poll() is None, "the interrupt must land mid-merge"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun with --resume" in err
    assert _partial_files(out) == [], "partial shards are removed"
    assert not os.path.exists(os.path.join(out, "config.json"))
    again = subprocess.run([*cmd, "--resume", "--quiet"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    same_shards(out, undisturbed)
