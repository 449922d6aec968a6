"""Where the actors go and on which device, for the merge and for scoring alike: how many, what
each asks of Ray, waiting for them to be placed, and what each placed actor reports about itself
(the device it can use, the parents it can read, the output it can write).

The shape comes from the live nodes' resources. A request the live nodes cannot hold is refused at
once on a fixed cluster; on an autoscaling one (Ray's autoscaler watches it, with node types it
can launch) the actors are created anyway, and their pending demand is what makes the autoscaler
add nodes: the merge waits, saying so, until every actor is placed or the schedule timeout ends.

An actor given a GPU computes there or not at all: one whose torch cannot use CUDA stops the
merge (never a silent fallback to a CPU it did not ask for, slowly and unseen).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from raymerge.errors import InputError
from raymerge.options import ClusterOptions

# How often a merge waiting for resources says so.
WAIT_REPORT_S = 5.0
# How long a head just started may take to publish its monitor's first report (Ray's monitor
# reports every 5 s): a request no live node can hold is refused once it has, not before.
FIRST_REPORT_S = 10.0


@dataclass(frozen=True)
class ActorShape:
    count: int
    num_cpus: float
    num_gpus: float
    threads: int
    waits: bool = False  # the live nodes cannot hold every actor: an autoscaler must add nodes


def live_nodes() -> list[dict]:
    """The resources of each live node of the cluster Ray is connected to."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def merge_shape(options: ClusterOptions) -> ActorShape:
    """The merge actors' shape from the live nodes; a request they cannot hold waits for an
    autoscaler if one watches the cluster, else is refused at once."""
    nodes = live_nodes()
    try:
        return actor_shape(options, nodes)
    except InputError:
        if not cluster_autoscales():
            raise
        return actor_shape(options, nodes, autoscales=True)


def cluster_text(nodes: list[dict]) -> str:
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    return f"the cluster has {cpus:g} CPUs and {gpus:g} GPUs on {len(nodes)} node(s)"


def actor_shape(options: ClusterOptions, nodes: list[dict], autoscales: bool = False) -> ActorShape:
    """How many actors, and what each asks of Ray, given each live node's resources.

    ``--device auto``: one actor per GPU where the live nodes have GPUs (``--gpus-per-actor`` each:
    a fraction puts several actors on one GPU), else one per CPU; ``cpu``: CPU actors even on GPU
    nodes; ``gpu``: GPU actors. A request the live nodes cannot hold fails here, at once, unless
    ``autoscales`` (then ``waits``: ``--device gpu`` with no live GPU asks for ``--workers`` GPU
    actors, one by default, and the autoscaler adds the nodes).

    Example:
        >>> from raymerge.options import MergeOptions
        >>> actor_shape(MergeOptions(a="a", b="b", out="o").cluster, [{"CPU": 16.0, "GPU": 2.0}])
        ActorShape(count=2, num_cpus=0, num_gpus=1.0, threads=8, waits=False)
    """
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if options.device == "gpu" or (gpus > 0 and options.device != "cpu"):
        per = options.gpus_per_actor
        if not 0 < per <= 1:
            raise InputError(f"--gpus-per-actor {per:g}: an actor computes on one GPU; give at most 1 "
                             "(a fraction, such as 0.5, puts several actors on each GPU)")
        fit = sum(int(n.get("GPU", 0) // per) for n in nodes)
        count = options.workers or fit or 1
        if count > fit and not autoscales:
            if gpus <= 0:
                raise InputError(f"--device gpu, but {cluster_text(nodes)} and no autoscaler can add GPU nodes")
            raise InputError(f"{count} actor(s) with {per:g} GPU(s) each can never be scheduled: "
                             f"{cluster_text(nodes)} (largest node: {max(n.get('GPU', 0) for n in nodes):g} GPUs)")
        return ActorShape(count, 0, per, max(1, int(cpus // max(1, count))), waits=count > fit)
    if cpus <= 0 and not autoscales:
        raise InputError(f"no actor can be scheduled: {cluster_text(nodes)}")
    count = options.workers or int(cpus) or 1
    largest = max([n.get("CPU", 0) for n in nodes] + [0])
    # More actors than CPUs share them (fractions); fewer get several each, within one node.
    per = min(largest, cpus // count) if count <= cpus else int(100 * cpus / count) / 100
    fit = sum(int(n.get("CPU", 0) // per) for n in nodes) if per > 0 else 0
    if per <= 0 or fit < count:
        if not autoscales:
            raise InputError(f"{count} CPU actors can never be scheduled: {cluster_text(nodes)}")
        return ActorShape(count, max(per, 1), 0, max(1, int(per)), waits=True)
    return ActorShape(count, per, 0, max(1, int(per)))


def cluster_autoscales() -> bool:
    """Whether Ray's autoscaler watches this cluster with node types it can launch.

    Ray's monitor publishes its report in the GCS. On a fixed cluster (``ray start`` without an
    autoscaling config) its node provider is read-only and names each node's type after the node
    itself (``node_<id>``); an autoscaler names them after its config's node types
    (``gpu_workers``, ``ray.head.default``). The v2 autoscaler (KubeRay) reports the same through
    its status API. A head that has just started may not have published its first report yet:
    the answer waits for it, up to ``FIRST_REPORT_S``.
    """
    deadline = time.monotonic() + FIRST_REPORT_S
    while True:
        report = _autoscaler_report()
        mapping = (report or {}).get("node_type_mapping")
        mapping = mapping if isinstance(mapping, dict) else {}
        if any(not _read_only(node, kind) for node, kind in mapping.items()) or _v2_autoscales():
            return True
        if report is not None or time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _v2_autoscales() -> bool:
    """Whether the v2 autoscaler's status names node types it launches, or launches some."""
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - no v2 autoscaler state: nothing more to learn
        return False
    nodes = status.active_nodes + status.idle_nodes
    return any(not _read_only(n.node_id, n.ray_node_type_name) for n in nodes) or bool(status.pending_launches)


def _read_only(node_id: str, node_type: str) -> bool:
    """Whether a node's type is the one a read-only provider gives a node it did not launch."""
    return not node_type or node_type in (node_id, f"node_{node_id}")


def scoring_shape(nodes: list[dict], tasks: int, child_bytes: int, device: str = "auto") -> ActorShape:
    """The scoring actors (``--eval``): one per GPU (unless ``--device cpu``), else actors of up
    to 8 CPUs of one node; never more than ``tasks``. Each builds a whole child in memory, so a
    node must offer twice its size."""
    memory = max(n.get("memory", 0) for n in nodes)
    if memory and memory < 2 * child_bytes:
        raise InputError(f"no node can hold a child in memory to score it: the child is "
                         f"{child_bytes / 1e9:.2f} GB, the largest node offers {memory / 1e9:.2f} GB to Ray "
                         "(twice the child is needed)")
    gpus = sum(int(n.get("GPU", 0)) for n in nodes) if device != "cpu" else 0
    if gpus:
        return ActorShape(min(tasks, gpus), 0, 1, 1)
    per = min(8.0, max(n.get("CPU", 1) for n in nodes))
    count = int(max(1, min(tasks, sum(int(n.get("CPU", 0) // per) for n in nodes))))
    return ActorShape(count, per, 0, max(1, int(per)))


def cuda_problem() -> str | None:
    """Why this process's torch cannot compute on the GPU Ray gave it, or None when it can (run
    in the actor)."""
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - the reason is the message (e.g. a driver too old)
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if torch.cuda.device_count() == 0:
        return "no CUDA device is visible (CUDA_VISIBLE_DEVICES is empty)"
    return None


def check_reports(reports: list[dict], write_path: str | None = None) -> None:
    """Refuse, in one line, what a placed actor reports it cannot do: use its GPU, read a parent,
    write the output. (Each report is an actor's ``where``: host, node, gpu_error, missing,
    read_error, write_error.)"""
    for info in reports:
        if info.get("gpu_error"):
            raise InputError(f"actor on node {info['node']} (host {info['host']}) holds a GPU but torch cannot "
                             f"use CUDA: {info['gpu_error']}; run with --device cpu, or fix the node's torch")
        if info.get("read_error"):
            raise InputError(f"an actor on host {info['host']} cannot read {info['missing'][0]}: {info['read_error']}")
        if info.get("missing"):
            raise InputError(f"an actor on host {info['host']} cannot see {info['missing'][0]}: "
                             "parents must sit on storage every node sees, at the same path")
        error = info.get("write_error")
        if error == "not visible on this node":
            raise InputError(f"an actor on host {info['host']} cannot see {write_path}: "
                             "the output must sit on storage every node sees, at the same path")
        if error:
            raise InputError(f"an actor on host {info['host']} cannot write into {write_path}: {error}")


def wait_placed(pool, where_args: tuple, timeout_s: float, nodes, show: bool, waits: bool = False,
                stream=None) -> list[dict]:
    """Every actor's report (its ``where``), waiting until every actor is placed.

    While some are not, a line every few seconds says how many are and what the autoscaler is
    adding (at once when the shape ``waits`` for an autoscaler); after ``timeout_s`` the merge
    stops, naming what the cluster has (``nodes()``).
    """
    stream = stream or sys.stderr
    deadline = time.monotonic() + timeout_s
    reports: dict[int, dict] = {}
    for i in range(len(pool)):
        pool.submit(i, "where", *where_args, tag=i)

    def waiting(pending: int) -> None:
        if time.monotonic() >= deadline:
            raise InputError(f"{pending} of {len(pool)} actor(s) were not scheduled within {timeout_s:g} s; "
                             f"{cluster_text(nodes())}")
        if show:
            stream.write(f"waiting for resources: {len(pool) - pending} of {len(pool)} actor(s) placed; "
                         f"{cluster_text(nodes())}{_launching()}\n")
            stream.flush()

    if waits:
        waiting(len(pool))
    pool.wait(reports.__setitem__, every_s=min(WAIT_REPORT_S, timeout_s), on_tick=waiting)
    return [reports[i] for i in range(len(pool))]


def place(pool, options: ClusterOptions, where_args: tuple = (), write_path: str | None = None,
          waits: bool = False) -> list[dict]:
    """Every actor's report once all are placed (``wait_placed``, with the options' timeout and
    progress) and able to do their work (``check_reports``); else one InputError."""
    reports = wait_placed(pool, where_args, options.schedule_timeout_s, live_nodes, show=options.progress, waits=waits)
    check_reports(reports, write_path)
    return reports


def _autoscaler_report() -> dict | None:
    """The autoscaler part of the report Ray's monitor publishes in the GCS: None before its
    first, {} where it cannot be read.

    The monitor publishes its status from its first round on, but the autoscaler part only once
    its autoscaler has had the nodes' load (the rounds before log "Autoscaler has not yet
    received load metrics"): a status without it is no report yet."""
    try:  # Ray's private API: another Ray version may lack it, or publish another shape
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        if not raw:
            return None
        status = json.loads(raw)
        if not isinstance(status, dict):
            return {}
        if "autoscaler_report" not in status:
            return None
        report = status["autoscaler_report"] or {}
        return report if isinstance(report, dict) else {}
    except Exception:  # noqa: BLE001 - no report to read: nothing more to learn
        return {}


def _launching() -> str:
    """What the autoscaler says it is adding, as the end of a progress line."""
    report = _autoscaler_report() or {}
    try:
        launching = dict(report.get("pending_launches") or {})
        for _node, kind, *_ in report.get("pending_nodes") or []:
            launching[kind] = launching.get(kind, 0) + 1
    except (TypeError, ValueError):  # a report of another shape (another Ray version)
        return ""
    if not launching:
        return ""
    return "; the autoscaler is adding " + ", ".join(f"{n} {kind}" for kind, n in sorted(launching.items()))
