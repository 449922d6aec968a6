"""Merges whose output directory is one S3 bucket mounted (s3fs) on each of two Ray nodes (the
``bucket_cluster`` fixture, see buckets.py): what the actors write on each node must reach the
bucket whole, as a merge to local disk does.

Each output is read back through a third s3fs mount (no cache of the nodes' mounts) and through
pyarrow (past s3fs), and must be byte-identical to the same merge written to a local directory.
Its ``raymerge.json`` must record, for every shard of the index, one writer (an actor, on one of
the two nodes) and the size and CRC-32 of the bytes the bucket holds; the writers span both nodes.
Covered: one t, a sweep of three, parents and output as s3:// URIs (no mount), and a merge killed mid-shard (driver and a writing actor) then
resumed, where the object the killed writer left must be rewritten.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import pytest

from raymerge import cli as raymerge_cli
from buckets import S3Mount, pyarrow_s3, list_objects, read_object, run_in_node, s3fs_open_files, start_in_node
from raynodes import freeze, merge_actor_pids, open_files, state
from reference import check_merged

CLI = [sys.executable, "-m", "raymerge.cli"]
PROVENANCE = {"raymerge.json", "README.md"}  # they record the command and paths, which differ
INDEX = "model.safetensors.index.json"

# tiny_parents hold ~560 KB of tensors: a few shards, so both actors write some.
TINY = ("--workers", "2", "--max-shard-size", "200KB")
SWEEP = ("-t", "0.2", "-t", "0.5", "-t", "0.8")
SWEEP_DIRS = ("t-0.2", "t-0.5", "t-0.8")
# medium_parents hold ~116 MB: five shards, and small row blocks make a shard take a while to write.
MEDIUM = ("--workers", "2", "--max-shard-size", "20MB", "--block-size", "256KiB")


# ---- merging ---------------------------------------------------------------------------------

def merge_argv(c, parents, out: str, options, *more: str) -> list[str]:
    """The CLI merge of ``parents`` into ``out`` on the bucket cluster's Ray."""
    return [*CLI, "merge", *parents, "-o", out, "--address", c.address, *options, "--quiet", *more]


def merge_into_bucket(c, parents, name: str, options, *more: str) -> str:
    """Merge into ``name`` on the bucket, from the head's namespace (where it is mounted); returns
    the path there."""
    out = os.path.join(c.mount, name)
    merged = run_in_node(c.head, merge_argv(c, parents, out, options, *more), env=c.env, timeout=600)
    assert merged.returncode == 0, merged.stderr
    return out


def merge_locally(parents, out: str, options) -> dict[str, bytes]:
    """The same merge into a local directory, in this process on the session's Ray (output
    bytes never depend on the cluster): the reference; returns its files."""
    assert raymerge_cli.run(["merge", *parents, "-o", out, *options, "--quiet"]) == 0
    return files(out)


# ---- reading back ----------------------------------------------------------------------------

def files(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (relative path: bytes) but the provenance files."""
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names if n not in PROVENANCE}


def difference(name: str, got: bytes, expected: bytes) -> str:
    n = min(len(got), len(expected))
    first = next((i for i in range(n) if got[i] != expected[i]), n)
    wrong = sum(x != y for x, y in zip(got, expected))
    zeros = sum(1 for x in got[first:] if x == 0)
    return (f"  {name}: {len(got)} bytes, {len(expected)} expected; first difference at byte {first}, "
            f"{wrong} of the first {n} bytes differ, {zeros} of the {len(got) - first} bytes from there are 0")


def assert_bucket_holds(c, name: str, expected: dict[str, bytes], log_dir) -> dict[str, bytes]:
    """The bucket's ``name/`` holds exactly ``expected`` (but provenance), read through a mount
    neither node made and through pyarrow; returns what was read."""
    with S3Mount(c.bucket, c.endpoint, c.passwd_file, str(log_dir / "third-mount.log")) as mount:
        got = files(os.path.join(mount, name))
    assert sorted(got) == sorted(expected)
    differ = [difference(n, got[n], expected[n]) for n in sorted(expected) if got[n] != expected[n]]
    assert not differ, f"{name} differs from the local merge (read through s3fs):\n" + "\n".join(differ)
    for n in expected:
        assert read_object(c.endpoint, c.bucket, f"{name}/{n}") == expected[n], n
    return got


def provenance(c, key: str) -> dict:
    """An output's raymerge.json, read from the bucket by pyarrow."""
    return json.loads(read_object(c.endpoint, c.bucket, f"{key}/raymerge.json"))


def assert_written_once(c, key: str, got: dict[str, bytes], sub: str = "") -> set[str]:
    """Every shard of the index of the output in ``key/sub`` has one writer in its raymerge.json,
    and the size and CRC-32 of the bytes read back (``got``: the files under ``key``); returns
    the writers' Ray nodes."""
    index = json.loads(got[os.path.join(sub, INDEX)])
    shard_files = {n: got[os.path.join(sub, n)] for n in set(index["weight_map"].values())}
    recorded = provenance(c, os.path.join(key, sub) if sub else key)["shards"]
    assert sorted(recorded) == sorted(shard_files), "raymerge.json lists exactly the index's shards"
    for n, data in shard_files.items():
        entry = recorded[n]
        assert (entry["size"], entry["crc32"]) == (len(data), zlib.crc32(data)), f"{sub}/{n}: {entry}"
        writer = entry["writer"]
        assert isinstance(writer, dict) and sorted(writer) == ["host", "node", "pid"], f"{sub}/{n}: one writer"
        assert isinstance(writer["pid"], int) and int(writer["node"], 16) >= 0, f"{sub}/{n}: {writer}"
    return {entry["writer"]["node"] for entry in recorded.values()}


# ---- one t, and a sweep ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_reference(tiny_parents, bucket_cluster, ray_head, tmp_path_factory):
    local = str(tmp_path_factory.mktemp("local") / "child")
    expected = merge_locally(tiny_parents, local, TINY)
    check_merged(local, *tiny_parents, t=0.5)  # so the bucket's copy is every tensor's SLERP too
    assert sum(n.endswith(".safetensors") for n in expected) > 2, "several shards"
    assert INDEX in expected
    return expected


@pytest.fixture(scope="module")
def sweep_reference(tiny_parents, bucket_cluster, ray_head, tmp_path_factory):
    expected = merge_locally(tiny_parents, str(tmp_path_factory.mktemp("local") / "sweep"),
                             (*TINY, *SWEEP))
    assert {n.split(os.sep)[0] for n in expected} == set(SWEEP_DIRS)
    return expected


def test_a_sweep_into_a_bucket_mounted_on_two_nodes(tiny_parents, bucket_cluster, sweep_reference, tmp_path):
    """Each t of a sweep is byte-identical to a local sweep's; each shard was written by one actor,
    whole (its recorded size and CRC-32 are those of the object), and both nodes wrote shards.
    This is also the suite's two-node loopback cluster (a head and a worker of 1 CPU each): its
    actors run on both nodes, and the fixture's teardown finds no process of theirs left. (One t
    written at OUT's root, on the same mount: the resume test below.)"""
    c = bucket_cluster
    out = os.path.join(c.mount, "sweep")
    merged = run_in_node(c.head, merge_argv(c, tiny_parents, out, (*TINY, *SWEEP)), env=c.env, timeout=600)
    assert merged.returncode == 0, merged.stderr
    assert "with 2 actors on 2 node(s)" in merged.stderr, merged.stderr
    got = assert_bucket_holds(c, "sweep", sweep_reference, tmp_path)
    for sub in SWEEP_DIRS:
        assert len(assert_written_once(c, "sweep", got, sub)) == 2, f"{sub}: both nodes wrote shards"


def test_s3_parents_and_output_on_two_nodes(tiny_parents, bucket_cluster, tiny_reference, tmp_path):
    """No mount at all: parents and output as s3:// URIs, the server and credentials in the
    standard AWS variables. Byte-identical to the local merge, each shard written once, by actors
    on both nodes. (That the driver hands the variables to actors whose nodes lack them is
    test_object_store's: its Ray head has none.)"""
    c = bucket_cluster
    s3 = pyarrow_s3(c.endpoint)
    for label, parent in zip("ab", tiny_parents):
        for name in os.listdir(parent):
            with open(os.path.join(parent, name), "rb") as f, \
                    s3.open_output_stream(f"{c.bucket}/parents/{label}/{name}") as o:
                o.write(f.read())
    parents = [f"s3://{c.bucket}/parents/a", f"s3://{c.bucket}/parents/b"]
    merged = subprocess.run(merge_argv(c, parents, f"s3://{c.bucket}/by-uri", TINY), capture_output=True, text=True,
                            timeout=300, env={**os.environ, **c.env})
    assert merged.returncode == 0, merged.stderr
    got = assert_bucket_holds(c, "by-uri", tiny_reference, tmp_path)
    assert len(assert_written_once(c, "by-uri", got)) == 2, "both nodes wrote shards"


# ---- killed mid-shard, then resumed ----------------------------------------------------------

def open_shards(pid: int, out: str) -> dict[str, int]:
    """The shards under ``out`` (a path in the nodes' namespaces) that ``pid`` holds open, and
    how many bytes each has so far."""
    return {os.path.basename(path): size for path, size in open_files(pid, out).items()
            if path.endswith(".safetensors")}


def freeze_a_writer(c, out: str, planned: dict[str, int], driver: subprocess.Popen) -> tuple[int, str, int] | None:
    """Stop (SIGSTOP) an actor mid-shard: it holds a shard of ``out`` open (it is inside a write
    call) with some but not all of its ``planned`` bytes written, so it is not yet in the fsync
    of ``close``, in which s3fs uploads the whole shard. Watches the actors until one is so, or
    until the driver exits. (A thread stops once its system call returns: the sizes are read
    again when all have; a busy machine may take a while to stop all of an actor's threads, and
    a shard finished meanwhile means trying the next.) Returns the actor, the shard's name and
    its bytes written, or None."""

    def mid_shard(pid: int) -> tuple[str, int] | None:
        return next(((shard, size) for shard, size in open_shards(pid, out).items() if 0 < size < planned[shard]),
                    None)

    actors: list[int] = []
    while driver.poll() is None:
        if len(actors) < 2:  # MEDIUM's two actors; their processes are found once
            actors = merge_actor_pids(c.head, c.worker)
        for pid in actors:
            if mid_shard(pid) and freeze(pid, lambda: mid_shard(pid)):
                return (pid, *mid_shard(pid))
        time.sleep(0.002)
    return None


def wait_for(predicate, timeout: float = 120.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(step)
    return None


def done_records(c, name: str) -> dict[str, dict]:
    """The completion records in the bucket: shard filename -> record."""
    keys = list_objects(c.endpoint, c.bucket, f"{name}/.raymerge/done")
    return {k.removesuffix(".json"): json.loads(read_object(c.endpoint, c.bucket, f"{name}/.raymerge/done/{k}"))
            for k in keys if k.endswith(".json")}


@pytest.fixture(scope="module")
def medium_reference(medium_parents, bucket_cluster, ray_head, tmp_path_factory):
    return merge_locally(medium_parents, str(tmp_path_factory.mktemp("local") / "medium"), MEDIUM)


def test_a_merge_killed_mid_shard_then_resumed(medium_parents, bucket_cluster, medium_reference, tmp_path):
    """An actor is frozen mid-shard (inside a write call); once some shard is finished, the driver
    is killed (SIGKILL; Ray then stops its actors) and so is the frozen actor: s3fs uploads what
    the killed writers had written once the kernel releases their files. No config.json is in
    the bucket; the resume keeps the finished shards and rewrites the others, byte-identical to
    a local merge, with the checks above."""
    c = bucket_cluster
    name = "resumed"
    out = os.path.join(c.mount, name)
    argv = merge_argv(c, medium_parents, out, MEDIUM)
    planned = {n: len(data) for n, data in medium_reference.items()}
    driver = start_in_node(c.head, argv, str(tmp_path / "interrupted.log"), env=c.env)

    def finished_shards() -> bool:
        return any(k.endswith(".json") for k in list_objects(c.endpoint, c.bucket, f"{name}/.raymerge/done"))

    victim = None
    try:
        # A writer frozen mid-shard first (most of a merge offers one), then the other actor's
        # work goes on until some shard is finished, which the resume will keep.
        victim = freeze_a_writer(c, out, planned, driver)
        assert victim, f"no actor was seen mid-shard; the merge's output:\n{(tmp_path / 'interrupted.log').read_text()}"
        assert wait_for(finished_shards, timeout=120), "no shard was finished while a writer was frozen"
        assert driver.poll() is None, "the kill must land mid-merge"
    finally:
        actors = merge_actor_pids(c.head, c.worker)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's whole process group
        driver.wait(timeout=60)
        if victim:
            os.kill(victim[0], signal.SIGKILL)  # a stopped process dies of SIGKILL as it is
    victim_pid, victim_shard, written = victim
    # The kernel releases a killed process's files once it is gone; s3fs then uploads them.
    assert wait_for(lambda: all(state(pid) in "ZX" for pid in actors), timeout=60), "the actors did not stop"
    assert wait_for(lambda: not s3fs_open_files(c.head) and not s3fs_open_files(c.worker), timeout=60), \
        "s3fs did not release the killed writers' files"

    before = list_objects(c.endpoint, c.bucket, name)
    kept = done_records(c, name)
    assert "config.json" not in before, "an interrupted merge must not look like a model"
    assert kept and victim_shard not in kept, sorted(kept)
    # What the resume must rewrite: the part the killed writer had written, uploaded as the shard.
    assert before.get(victim_shard) == written, \
        f"{victim_shard}: killed with {written} of {planned[victim_shard]} bytes written; the bucket holds {before}"

    merge_into_bucket(c, medium_parents, name, MEDIUM, "--resume")
    got = assert_bucket_holds(c, name, medium_reference, tmp_path)
    assert len(assert_written_once(c, name, got)) == 2, "both nodes wrote shards"
    shards = provenance(c, name)["shards"]
    for shard, record in kept.items():
        assert shards[shard]["writer"] == record["writer"], f"{shard} was finished and should have been kept"
    assert shards[victim_shard]["writer"]["pid"] != victim_pid, f"{victim_shard} was rewritten"
