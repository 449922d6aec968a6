"""Cluster paths on this machine: an autoscaler, a head declaring a GPU this machine lacks, fail-fast
resource checks (`ray job submit`: test_jobs.py). Every Ray process a test starts, it stops by process id.
Commands run in this process, attached to the cluster under test for the while (conftest's ``attach``)."""

from __future__ import annotations

import os
import re
import time

import pytest

from raymerge.placement import actor_shape
from raymerge.errors import InputError
from raymerge.options import ClusterOptions, MergeOptions
from raynodes import RayNode

def _options(**kw) -> ClusterOptions:
    return MergeOptions(a="a", b="b", out="o", **kw).cluster


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


def test_actor_shape_chooses_devices():
    gpu_node = [{"CPU": 224.0, "GPU": 8.0}]
    auto = actor_shape(_options(), gpu_node)
    assert (auto.count, auto.num_gpus, auto.num_cpus, auto.threads) == (8, 1.0, 0, 28), "one actor per GPU"
    cpu = actor_shape(_options(device="cpu", workers=64), gpu_node)
    assert (cpu.count, cpu.num_gpus, cpu.num_cpus) == (64, 0, 3.0), "CPU actors on a GPU node"
    assert actor_shape(_options(device="cpu"), gpu_node).count == 224
    shared = actor_shape(_options(gpus_per_actor=0.25), [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}])
    assert (shared.count, shared.num_gpus) == (12, 0.25), "four actors on each GPU of both nodes"
    assert actor_shape(_options(device="gpu"), [{"CPU": 4.0, "GPU": 1.0}]).num_gpus == 1.0


@pytest.mark.parametrize("kw,nodes,expected", [
    ({"gpus_per_actor": 2.0}, 2, "--gpus-per-actor 2: an actor computes on one GPU; give at most 1"),
    ({"gpus_per_actor": 0.0}, 2, "--gpus-per-actor 0: an actor computes on one GPU"),
    ({"workers": 3}, 2, "3 actor(s) with 1 GPU(s) each can never be scheduled: the cluster has 8 CPUs and 2 GPUs "
                        "on 2 node(s)"),
    ({"device": "gpu"}, 0, "--device gpu, but the cluster has 8 CPUs and 0 GPUs on 2 node(s)"),
    ({"device": "cpu", "workers": 9}, 2, "9 CPU actors can never be scheduled: the cluster has 8 CPUs"),
])
def test_impossible_requests_are_refused(kw, nodes, expected):
    with pytest.raises(InputError) as e:
        actor_shape(_options(**kw), [{"CPU": 4.0, "GPU": 1.0 * (nodes > 0)}, {"CPU": 4.0, "GPU": 1.0 * (nodes > 0)}])
    assert expected in str(e.value)


def test_actor_shape_waits_for_an_autoscaler():
    """On an autoscaling cluster a request the live nodes cannot hold waits (the pending actors
    make the autoscaler add nodes); one they can hold never waits; a shape no node type could ever
    take is still refused."""
    cpu_head = [{"CPU": 4.0}]
    gpu = actor_shape(_options(device="gpu"), cpu_head, autoscales=True)
    assert (gpu.count, gpu.num_gpus, gpu.waits) == (1, 1.0, True), "--device gpu: one GPU actor by default"
    assert actor_shape(_options(device="gpu", workers=4), cpu_head, autoscales=True).count == 4
    more = actor_shape(_options(workers=3), [{"CPU": 4.0, "GPU": 1.0}] * 2, autoscales=True)
    assert (more.count, more.num_gpus, more.waits) == (3, 1.0, True)
    cpus = actor_shape(_options(device="cpu", workers=9), [{"CPU": 4.0}] * 2, autoscales=True)
    assert (cpus.count, cpus.waits) == (9, True) and cpus.num_cpus > 0
    assert not actor_shape(_options(), [{"CPU": 4.0, "GPU": 1.0}] * 2, autoscales=True).waits
    assert not actor_shape(_options(), cpu_head, autoscales=True).waits, "auto uses the live CPUs"
    with pytest.raises(InputError, match="give at most 1"):
        actor_shape(_options(device="gpu", gpus_per_actor=2.0), cpu_head, autoscales=True)
    with pytest.raises(InputError, match="--device gpu, but the cluster has 4 CPUs and 0 GPUs on 1 node.s. and no "
                                         "autoscaler can add GPU nodes"):
        actor_shape(_options(device="gpu"), cpu_head)


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory):
    """A CPU head whose Ray autoscaler can add one node with a GPU (Ray's fake multi-node provider
    starts it as processes of this machine; the GPU is declared, and this torch is a CPU build)."""
    node = RayNode(str(tmp_path_factory.mktemp("autoscale") / "head.log"), num_cpus=1,
                   autoscaled={"gpu_workers": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 1}}, dashboard=False)
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def test_a_gpu_request_waits_for_the_autoscaler(tiny_parents, autoscaling_head, attach, cli, tmp_path):
    """`--device gpu` on a cluster with no live GPU: the merge waits, saying so, the autoscaler
    adds a GPU node, and the actor placed there reports its device (here: unusable, so the merge
    stops in one line, before writing anything). Without the autoscaler it is refused at once."""
    with attach(autoscaling_head):
        proc = cli("merge", *tiny_parents, "-o", tmp_path / "out", "--device", "gpu", "--schedule-timeout", "120",
                   "--address", autoscaling_head.address)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("waiting for resources: 0 of 1 actor(s) placed; the cluster has 1 CPUs and 0 GPUs"), \
        lines
    assert re.fullmatch(r"raymerge: error: actor on node [0-9a-f]+ \(host [^)]+\) holds a GPU but torch cannot use "
                        r"CUDA: .*", lines[-1]), lines
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def fake_gpu_head(tmp_path_factory):
    """A one-node cluster that declares a GPU it does not have (Ray schedules by declared
    resources); this machine's torch is a CPU build."""
    node = RayNode(str(tmp_path_factory.mktemp("gpu") / "gpu-head.log"), num_cpus=2, extra_args=["--num-gpus=1"],
                   dashboard=False)
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def test_impossible_request_fails_within_seconds(tiny_parents, fake_gpu_head, attach, cli, tmp_path):
    started = time.monotonic()
    with attach(fake_gpu_head):
        proc = cli("merge", *tiny_parents, "-o", tmp_path / "out", "--workers", "2", "--address", fake_gpu_head.address)
    assert proc.returncode == 1
    assert proc.stderr == ("raymerge: error: 2 actor(s) with 1 GPU(s) each can never be scheduled: the cluster "
                           "has 2 CPUs and 1 GPUs on 1 node(s) (largest node: 1 GPUs)\n"), proc.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()


def test_an_actor_holding_a_gpu_it_cannot_use_stops_the_merge(tiny_parents, fake_gpu_head, attach, cli, tmp_path):
    """No silent CPU fallback: the default (auto) puts an actor on the declared GPU, the actor's
    torch has no CUDA, and the merge stops in one line before writing anything."""
    import torch

    with attach(fake_gpu_head):
        proc = cli("merge", *tiny_parents, "-o", tmp_path / "out", "--address", fake_gpu_head.address)
    assert proc.returncode == 1
    assert re.fullmatch(r"raymerge: error: actor on node [0-9a-f]+ \(host [^)]+\) holds a GPU but torch cannot use "
                        rf"CUDA: this torch \({re.escape(torch.__version__)}\) is built without CUDA; run with "
                        r"--device cpu, or fix the node's torch\n", proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


def test_scoring_actors_holding_a_gpu_they_cannot_use_stop_the_sweep(tiny_parents, fake_gpu_head, attach, tmp_path):
    """`--eval`'s scoring actors follow the merge's rule: placed on the declared GPU, with a torch
    that has no CUDA, they stop the sweep in the same line a merge actor does (they used to score
    on the CPU instead, silently). Driven directly: on this one-node cluster the merge actors,
    placed first on the same GPU, would refuse before scoring starts."""
    import torch

    from raymerge import evaluation
    from raymerge.parents import load_parent
    from raymerge.plan import build_plan

    text = tmp_path / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    options = MergeOptions(a=tiny_parents[0], b=tiny_parents[1], out="unused", eval_text=str(text),
                           schedule_timeout_s=60, progress=False)
    a, b = load_parent(options.a, "A"), load_parent(options.b, "B")
    plan = build_plan((a, b), options, 1)
    with attach(fake_gpu_head), pytest.raises(InputError) as refused:
        evaluation.evaluate(options.cluster, plan, evaluation.prepare(options.scoring, a, b, plan), a, b, {}, {}, [])
    assert re.fullmatch(r"actor on node [0-9a-f]+ \(host [^)]+\) holds a GPU but torch cannot use "
                        rf"CUDA: this torch \({re.escape(torch.__version__)}\) is built without CUDA; run with "
                        r"--device cpu, or fix the node's torch", str(refused.value)), str(refused.value)


def test_device_cpu_on_a_gpu_node_merges_the_same_bytes(tiny_parents, fake_gpu_head, attach, cli, tmp_path):
    """`--device cpu` runs CPU actors on the GPU node; the output equals a merge on a node without
    GPUs byte for byte (the session's head)."""
    outs = {"gpu-node": tmp_path / "gpu-node", "plain": tmp_path / "plain"}
    with attach(fake_gpu_head):
        proc = cli("merge", *tiny_parents, "-o", outs["gpu-node"], "-t", "0.4", "--quiet",
                   "--address", fake_gpu_head.address, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    plain = cli("merge", *tiny_parents, "-o", outs["plain"], "-t", "0.4", "--quiet")
    assert plain.returncode == 0, plain.stderr
    for f in sorted(os.listdir(outs["plain"])):
        if f.endswith(".safetensors"):
            assert (outs["gpu-node"] / f).read_bytes() == (outs["plain"] / f).read_bytes(), f
