"""Session fixtures: tiny and medium Llama parents built locally, one Ray head shared by the
session, and a two-node cluster sharing a mounted S3 bucket."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass

import pytest

from raymerge.synthetic import build_parent, llama_config
from raynodes import RayNode

VOCAB = 1000


_token_dir = None


def pytest_configure(config):
    """Token authentication for the session's Ray (Ray's default for local clusters since 2.59).

    Ray reads RAY_AUTH_* once per process, so they are set before anything imports ray; the
    CLI processes the tests start inherit them. The token lives in a temporary directory.
    """
    global _token_dir
    _token_dir = tempfile.mkdtemp(prefix="raymerge-token-")
    token = os.path.join(_token_dir, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = token


# The slowest files, slowest first (`make test`'s --durations): pytest-xdist hands whole files to
# its two workers in collection order, so a slow file collected late leaves the other worker idle
# at the end of the run.
SLOWEST_FILES = ("test_buckets.py", "test_search.py", "test_cluster.py", "test_faults.py", "test_eval.py",
                 "test_jobs.py", "test_output_lock.py", "test_ecosystem.py", "test_object_store.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_unconfigure(config):
    if _token_dir:
        shutil.rmtree(_token_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("raymerge")


@pytest.fixture(scope="session")
def tiny_parents(session_dir):
    """Two untied tiny Llamas of the same shape; B is a noisy fine-tune of A."""
    config = llama_config(vocab_size=VOCAB)
    a = build_parent(str(session_dir / "parent-a"), config, seed=1)
    b = build_parent(str(session_dir / "parent-b"), config, seed=2, base=(config, 1))
    return a, b


@pytest.fixture(scope="session")
def medium_parents(session_dir):
    """Two Llamas of ~116 MB each (bfloat16, 32000-token vocabulary, 8 layers): with small row
    blocks their merge takes seconds, long enough for a test to interrupt it mid-shard."""
    cfg = llama_config(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8)
    root = session_dir / "medium"
    return (build_parent(str(root / "a"), cfg, seed=41),
            build_parent(str(root / "b"), cfg, seed=42, base=(cfg, 41)))


@pytest.fixture(scope="session")
def ray_head(session_dir):
    """A Ray head on 127.0.0.1 (token authentication, one CPU), and this process attached to it."""
    import ray

    # One CPU: pytest-xdist's two processes each have a head, and this machine has two cores. A
    # merge then starts one actor by default; tests of several actors ask for them (--workers).
    node = RayNode(str(session_dir / "ray-head.log"), num_cpus=1)
    try:
        node.wait_ready()
        # Actors' output is not forwarded, as the CLI's own Ray does not forward it: an in-process
        # command's stderr holds what the CLI prints and nothing Ray adds.
        ray.init(address=node.address, logging_level="ERROR", log_to_driver=False)
        yield node
    finally:
        if ray.is_initialized():
            ray.shutdown()
        node.stop()


@pytest.fixture
def attach(ray_head):
    """``with attach(node):`` runs the block with this process attached to another cluster's Ray
    instead of the session's (its merges and ``cli`` calls run there, without the seconds a new
    Python spends importing torch and transformers), then attaches it back to the session's head.
    Merge actors kept for reuse are stopped on either side of the switch."""
    import ray

    from raymerge import pool

    def switch(address: str) -> None:
        pool.release_idle()
        ray.shutdown()
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)

    @contextlib.contextmanager
    def attached(node):
        try:
            switch(node.address)
            yield node
        finally:
            switch(ray_head.address)

    return attached


@dataclass
class CliResult:
    """One command line's exit status and what it printed."""
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(ray_head, capfd):
    """``cli(*args)``: one ``raymerge`` command line run in this process (``raymerge.cli.run``),
    without the seconds a new Python spends importing torch, transformers and Ray.

    The process is attached to the session's Ray, so a merge that gets as far as Ray uses it
    (RaySession neither starts nor stops one) and never starts an embedded Ray here. Output is
    read at the descriptors (capfd). The real exit path (``entry``, ``os._exit``) is
    test_cli.py's subprocess test."""
    from raymerge import cli as raymerge_cli

    def run(*args) -> CliResult:
        capfd.readouterr()  # what the test printed before is not the command's
        code = raymerge_cli.run([str(a) for a in args])
        out, err = capfd.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture(scope="session")
def bucket_cluster(tmp_path_factory):
    """A moto S3 server with one bucket, and two Ray nodes (1 CPU each, resources node_a and
    node_b), each in its own mount namespace with its own s3fs mount of the bucket at
    ``cluster.mount``: see buckets.py. Skipped where root, s3fs or unshare are missing; in CI
    (CI set) that fails instead, since CI installs them."""
    import buckets

    reason = buckets.missing()
    if reason:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"no S3 bucket cluster: {reason}")
    with buckets.bucket_cluster(str(tmp_path_factory.mktemp("bucket"))) as cluster:
        yield cluster
