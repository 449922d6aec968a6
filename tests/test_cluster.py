"""Cluster paths on this machine: a two-node loopback cluster, `ray job submit`, fail-fast
resource checks. Every Ray process a test starts, it stops by process id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from raymerge.driver import actor_shape
from raymerge.errors import InputError
from raymerge.options import MergeOptions
from raynodes import RayNode, descendants
from reference import check_merged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "raymerge.cli"]


def _options(**kw) -> MergeOptions:
    return MergeOptions(a="a", b="b", out="o", **kw)


def test_actor_shape_cpu_and_gpu_clusters():
    two_nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert actor_shape(_options(), two_nodes).count == 2
    one = actor_shape(_options(workers=1), two_nodes)
    assert (one.count, one.num_cpus) == (1, 1.0), "one actor must still fit on one node"
    many = actor_shape(_options(workers=8), [{"CPU": 2.0}])
    assert many.count == 8 and many.num_cpus == 0.25, "more actors than CPUs share them"
    gpus = actor_shape(_options(), [{"CPU": 16.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 8.0}])
    assert (gpus.count, gpus.num_gpus) == (16, 1.0)
    assert actor_shape(_options(gpus_per_actor=0.5), [{"CPU": 8.0, "GPU": 2.0}]).count == 4


@pytest.mark.parametrize("kw,expected", [
    ({"gpus_per_actor": 2.0}, "1 actor(s) with 2 GPU(s) each can never be scheduled"),
    ({"workers": 3}, "3 actor(s) with 1 GPU(s) each can never be scheduled"),
])
def test_impossible_gpu_requests_are_refused(kw, expected):
    with pytest.raises(InputError, match=r"the cluster has 8 CPUs and 2 GPUs on 2 node\(s\)") as e:
        actor_shape(_options(**kw), [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}])
    assert expected in str(e.value)


@pytest.fixture
def fake_gpu_head(tmp_path):
    """A one-node cluster that declares a GPU (Ray schedules by declared resources)."""
    node = RayNode(str(tmp_path / "gpu-head.log"), num_cpus=2, extra_args=["--num-gpus=1"])
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def test_impossible_request_fails_within_seconds(tiny_parents, fake_gpu_head, tmp_path):
    started = time.monotonic()
    proc = subprocess.run([*CLI, "merge", *tiny_parents, "-o", str(tmp_path / "out"), "--gpus-per-actor", "2",
                           "--address", fake_gpu_head.address], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == ("raymerge: error: 1 actor(s) with 2 GPU(s) each can never be scheduled: the cluster "
                           "has 2 CPUs and 1 GPUs on 1 node(s) (largest node: 1 GPUs)\n"), proc.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()


def test_two_node_cluster_runs_actors_on_both_nodes(tiny_parents, tmp_path):
    head = RayNode(str(tmp_path / "head.log"), num_cpus=1)
    worker = None
    try:
        head.wait_ready()
        worker = RayNode(str(tmp_path / "worker.log"), head=False, address=head.address, num_cpus=1)
        worker.wait_ready()
        out = tmp_path / "out"
        proc = subprocess.run([*CLI, "merge", *tiny_parents, "-o", str(out), "-t", "0.6",
                               "--address", head.address], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "with 2 actors on 2 node(s)" in proc.stderr
        check_merged(str(out), *tiny_parents, t=0.6)
    finally:
        spawned = [p for n in (worker, head) if n for p in [n.proc.pid, *descendants(n.proc.pid)]]
        for n in (worker, head):
            if n:
                n.stop()
    time.sleep(0.5)
    alive = [p for p in spawned if os.path.exists(f"/proc/{p}") and "Z" not in _state(p)]
    assert not alive, f"processes left running: {alive}"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _local_job(*args):
    """Run cluster/local-job.sh in its own process group, and stop that group if it hangs."""
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "cluster", "local-job.sh"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"local-job.sh hung:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ray_job_submit_good_merge_succeeds(tiny_parents, tmp_path):
    out = tmp_path / "out"
    proc = _local_job(*tiny_parents, str(out), "-t", "0.25", "--workers", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCEEDED" in proc.stdout
    check_merged(str(out), *tiny_parents, t=0.25)


def test_ray_job_submit_bad_merge_fails(tiny_parents, tmp_path):
    proc = _local_job(str(tmp_path / "no-such-parent"), tiny_parents[1], str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "is not a directory" in proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout

