"""The driver: resolves parents, builds the plan from headers, drives the actors, assembles.

    parents ─ headers ─▶ plan ─▶ actors, per tensor: reduce, check, SLERP per t, write
                                 ─▶ each shard written whole by one actor, then recorded
                                 assembler ─▶ index, config, tokenizer, card, provenance

Headers, configs and tokenizers are checked before the output directory is created; tensor values
(finiteness, equality of non-float tensors) as each tensor is read, and a refusal then removes
every shard the merge wrote. ``--eval`` reduces every tensor first (its scores need every
tensor's coefficients), scores the children, then writes the ones it keeps.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raymerge import evaluation, split
from raymerge.actors import TensorStats, WriteJob, remote_actor_class
from raymerge.assemble import assemble
from raymerge.errors import InputError
from raymerge.options import MergeOptions
from raymerge.outdir import OutputDir
from raymerge.parents import Parent, load_parent
from raymerge.placement import actor_shape, cluster_autoscales, wait_placed
from raymerge.plan import MergePlan, TensorPlan, assign_actors, build_plan, chunk_by_size
from raymerge.progress import Progress
from raymerge.report import tensor_report
from raymerge.session import RaySession
from raymerge.slerp import slerp_coefficients

# Each reduce call (--eval's first pass) reads about this many bytes: progress moves, a lost actor
# costs one call, and no call runs for long. A write call is one shard: its one writer.
CALL_BYTES = 256 * 2**20


@dataclass(frozen=True)
class MergeResult:
    """What a merge produced: one output directory per t."""

    outputs: dict[str, str]  # t (as format(t, "g")) or the schedule -> output directory
    tensors: int
    bytes_written: int
    seconds: float
    actors: int
    nodes: int
    notes: tuple[str, ...]
    phases: tuple[tuple[str, float], ...] = ()  # (phase, wall seconds), in order
    scores: pa.Table | None = None  # --eval: one row per child and parent (evaluation.py)
    score_files: tuple[str, ...] = ()  # OUT/sweep.parquet, OUT/sweep.png
    actor_seconds: dict[str, float] = field(default_factory=dict)  # summed over the actors' calls (split.py)


class Phases:
    """Wall time spent in each phase of a merge: the summary's "time:" line and the benchmarks."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to ``phase``."""
        now = time.monotonic()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def load_parents(options: MergeOptions) -> tuple[Parent, Parent]:
    return load_parent(options.a, "A"), load_parent(options.b, "B")


def _live_nodes() -> list[dict]:
    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def _shape(options: MergeOptions):
    """The actors' shape from the live nodes; a request they cannot hold waits for an autoscaler
    if one watches the cluster (placement.py), else is refused at once."""
    nodes = _live_nodes()
    try:
        return actor_shape(options, nodes)
    except InputError:
        if not cluster_autoscales():
            raise
        return actor_shape(options, nodes, autoscales=True)


def _check_stats(plan: MergePlan, stats: dict[str, TensorStats]) -> None:
    """Refuse non-finite parents and differing non-float tensors, naming file and tensor."""
    for t in plan.tensors:
        s = stats.get(t.name)
        if s is None:
            continue
        for ok, entry, label in ((s.finite_a, t.a, "A"), (s.finite_b, t.b, "B")):
            if not ok and entry is not None:
                raise InputError(f"parent {label}: {entry.file}: tensor {entry.name!r} holds NaN or inf")
        if not s.equal:
            raise InputError(f"non-float tensor {t.name!r} differs between the parents: it cannot be merged")


def _run(pending: list, on_done) -> None:
    """Wait for Ray calls, handing each finished one to ``on_done(ref, value)``."""
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            on_done(ref, ray.get(ref))


def _stop_and_wait(actors: list, timeout_s: float = 60.0) -> None:
    """Kill the actors and return once Ray reports each one dead (ray.kill alone is asynchronous)."""
    for actor in actors:
        ray.kill(actor)
    for actor in actors:
        try:
            ray.get(actor.where.remote([]), timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass


def merge(options: MergeOptions, session: RaySession | None = None) -> MergeResult:
    """Merge two parents as ``options`` says and return what was written.

    ``session``: Ray, already starting (the CLI starts it before importing this module);
    by default the merge starts its own, which comes up while the parents are read and planned.

    Example:
        >>> merge(MergeOptions(a="parent-a", b="parent-b", out="child", t=(0.5,)))  # doctest: +SKIP
    """
    started = time.monotonic()
    phases = Phases()
    session = session or RaySession(options.address).start()
    try:
        return _merge(options, session, started, phases)
    finally:
        session.stop()


def _merge(options: MergeOptions, session: RaySession, started: float, phases: Phases) -> MergeResult:
    """The merge, with Ray coming up in ``session`` while the parents are read and planned."""
    a, b = load_parents(options)
    out = OutputDir(options.out, options.output_dirs())
    out.check_target([a.where, b.where])
    plan = build_plan(a, b, options, options.workers or os.cpu_count() or 1)
    fingerprint = plan.fingerprint(options)
    out.check_existing(fingerprint, options.resume, options.overwrite)
    t_by_name = {t.name: options.t_for(t.name, plan.n_layers) for t in plan.tensors if t.op == "slerp"}
    scoring = (evaluation.prepare(options, a, b, plan), a, b) if options.eval_text else None
    phases.lap("plan")

    session.wait()
    phases.lap("start Ray")
    shape = _shape(options)
    plan = assign_actors(plan, shape.count)
    actor_cls = remote_actor_class(shape.num_cpus, shape.num_gpus)

    def start_actors() -> list:
        return [actor_cls.remote(options.block_bytes, shape.threads, shape.num_gpus > 0, owns_process=True)
                for _ in range(plan.n_actors)]

    actors = start_actors()
    if scoring is not None:
        scoring = (*scoring, start_actors)
    try:
        written, n_nodes, scores, actor_seconds, records = _drive(options, plan, t_by_name, fingerprint, out,
                                                                  actors, phases, scoring, waits=shape.waits)
    except BaseException:
        # Interrupted or failed: stop the actors, and wait until they are gone, so that nobody
        # writes while the unfinished shards go (finished ones stay for --resume).
        _stop_and_wait(actors)
        out.remove_unfinished(plan)
        raise
    finally:
        for actor in actors:
            ray.kill(actor)
    # With --eval, the tensors were read and reduced before scoring: this is the writing.
    phases.lap("write" if options.eval_text else "merge")
    session.stop()
    phases.lap("stop Ray")

    outputs = {}
    for label, sub in zip(options.t_labels(), options.output_dirs()):
        if sub in out.subdirs:  # with --keep, only the chosen children
            shards = {plan.shards[i].filename: {**r["files"][sub], "writer": r["writer"]}
                      for i, r in sorted(records.items())}
            out.write_output(sub, lambda d: assemble(d, a, b, plan, options, label, fingerprint, shards))
            outputs[label] = out.output_path(sub)
    score_files = ()
    if scores is not None:
        out.write_output("", lambda d: evaluation.write_results(d, scores))
        score_files = tuple(out.final_path("", name) for name in evaluation.RESULT_FILES)
    out.cleanup()
    phases.lap("assemble")
    return MergeResult(outputs, len(plan.tensors), written, time.monotonic() - started,
                       plan.n_actors, n_nodes, plan.notes, tuple(phases.seconds.items()), scores, score_files,
                       actor_seconds=actor_seconds)


def _drive(options: MergeOptions, plan: MergePlan, t_by_name: dict[str, tuple[float, ...]],
           fingerprint: str, out: OutputDir, actors: list, phases: Phases,
           scoring: tuple | None, waits: bool = False) -> tuple[int, int, pa.Table | None, dict, dict]:
    """The merge, and with ``--eval`` first the reductions and scores; returns (bytes written,
    number of nodes the actors ran on, the scores, the actors' seconds per phase, each shard's
    completion record). ``waits``: the actors wait for an autoscaler."""
    read_paths = sorted({e.file for t in plan.tensors for e in (t.a, t.b) if e is not None})
    probe_dir = out.probe_dir()
    placed = wait_placed([actor.where.remote(read_paths, probe_dir) for actor in actors],
                         options.schedule_timeout_s, _live_nodes, show=options.progress, waits=waits)
    for info in placed:
        if info["gpu_error"]:
            # Never a silent fallback: an actor holding a GPU it cannot use would compute on the
            # CPU it did not ask for (num_cpus=0), slowly and unseen.
            raise InputError(f"actor on node {info['node']} (host {info['host']}) holds a GPU but torch cannot "
                             f"use CUDA: {info['gpu_error']}; run with --device cpu, or fix the node's torch")
        if info["read_error"]:
            raise InputError(f"an actor on host {info['host']} cannot read {info['missing'][0]}: {info['read_error']}")
        if info["missing"]:
            raise InputError(f"an actor on host {info['host']} cannot see {info['missing'][0]}: "
                             "parents must sit on storage every node sees, at the same path")
        _check_writable(info, probe_dir)
    phases.lap("start actors")

    scores, stats, coefficients, means = None, {}, None, {}
    if scoring is not None:
        # Scoring needs every tensor's coefficients before anything is written: a first pass
        # reduces them all, and the write pass takes the chosen children's coefficients.
        inputs, a, b, start_actors = scoring
        stats = _reduce_pass(options, plan, actors, plan.tensors)
        _check_stats(plan, stats)
        phases.lap("read + reduce")
        coefficients = _coefficients(stats, t_by_name)
        labels = options.t_labels()
        means = {n: s.means for n, s in stats.items() if s.means}
        # The scoring actors need the CPUs (or GPUs) the merge actors hold: stop those, and start
        # them again for the write pass (in place, so that the caller's clean-up sees the new ones).
        _stop_and_wait(actors)
        scores = evaluation.evaluate(options, plan, inputs, a, b, coefficients, means, labels)
        actors[:] = start_actors()
        phases.lap("score")
        kept = set(evaluation.kept_labels(scores, options.kept))
        chosen = [i for i, label in enumerate(labels) if label in kept]
        out.subdirs = [out.subdirs[i] for i in chosen]
        coefficients = {name: tuple(c[i] for i in chosen) for name, c in coefficients.items()}
        t_by_name = {name: tuple(ts[i] for i in chosen) for name, ts in t_by_name.items()}

    out.create(fingerprint, options.overwrite)
    for info in ray.get([actor.where.remote([], out.state_dir) for actor in actors]):
        _check_writable(info, out.root)
    written, merged, actor_seconds, records = _write_pass(options, plan, t_by_name, coefficients, means, out,
                                                          actors)
    stats = stats or merged
    if options.report:
        missing = [t for t in plan.tensors if t.name not in stats]  # in shards a resume kept
        if missing:
            stats.update(_reduce_pass(options, plan, actors, missing))
        os.makedirs(os.path.dirname(os.path.abspath(options.report)), exist_ok=True)
        pq.write_table(tensor_report(plan, {n: s.reductions for n, s in stats.items()},
                                     _coefficients(stats, t_by_name), t_by_name),
                       options.report)
    return written, len({info["node"] for info in placed}), scores, actor_seconds, records


def _coefficients(stats: dict[str, TensorStats], t_by_name: dict[str, tuple[float, ...]]) -> dict:
    """Every SLERP tensor's coefficients, one per t, from its reductions."""
    return {name: tuple(slerp_coefficients(stats[name].reductions, x) for x in ts) for name, ts in t_by_name.items()}


def _check_writable(info: dict, path: str) -> None:
    """Refuse an output an actor cannot write, saying why: unseen, read-only, full, forbidden."""
    error = info["write_error"]
    if error == "not visible on this node":
        raise InputError(f"an actor on host {info['host']} cannot see {path}: "
                         "the output must sit on storage every node sees, at the same path")
    if error:
        raise InputError(f"an actor on host {info['host']} cannot write into {path}: {error}")


def _by_actor(tensors) -> dict[int, list[TensorPlan]]:
    groups: dict[int, list[TensorPlan]] = defaultdict(list)
    for t in tensors:
        groups[t.actor].append(t)
    return groups


def _reduce_pass(options: MergeOptions, plan: MergePlan, actors: list, tensors) -> dict[str, TensorStats]:
    """The reductions, finiteness and equality of ``tensors``; nothing is written."""
    stats: dict[str, TensorStats] = {}
    progress = Progress("reduce", sum(t.read_bytes for t in tensors), enabled=options.progress)
    pending = {}
    for i, mine in _by_actor(tensors).items():
        for chunk in chunk_by_size(mine, CALL_BYTES, lambda t: t.read_bytes):
            pending[actors[i].reduce.remote(chunk)] = chunk

    def reduced(ref, values):
        for s in values:
            stats[s.name] = s
        progress.update(sum(t.read_bytes for t in pending[ref]))

    _run(list(pending), reduced)
    progress.close()
    return stats


def _write_pass(options: MergeOptions, plan: MergePlan, t_by_name: dict[str, tuple[float, ...]],
                coefficients: dict | None, means: dict, out: OutputDir,
                actors: list) -> tuple[int, dict[str, TensorStats], dict[str, float], dict[int, dict]]:
    """Make and write every shard not already finished, recording each when complete; returns the
    bytes written, the reductions of the tensors made, the actors' seconds per phase and every
    shard's completion record.

    A shard is one call to the actor that owns it, which writes it whole, front to back. Each
    tensor is reduced, checked and written in one read of its bytes, unless ``coefficients``
    (and ``means``) come from a first pass (``--eval``). A tensor that fails its checks stops the
    merge: the actors are stopped and every model file of this merge removed before the refusal
    is raised.
    """
    reduced = coefficients is not None
    records = out.finished_shards(plan)
    todo = [i for i in range(len(plan.shards)) if i not in records]
    out.clear_unfinished(plan, set(todo))
    per_actor: dict[int, list[tuple[WriteJob, int]]] = defaultdict(list)  # actor -> (job, shard), in order
    for i in todo:
        mine = [t.name for t in plan.shard_tensors(i)]
        names = [n for n in mine if n in t_by_name]
        job = WriteJob.for_shard(plan, i, tuple(out.final_path(sub, plan.shards[i].filename) for sub in out.subdirs),
                                 ts={n: t_by_name[n] for n in names}, reduced=reduced,
                                 coefficients={n: coefficients[n] for n in names} if reduced else {},
                                 means={n: means[n] for n in mine if n in means})
        per_actor[job.tensors[0].actor].append((job, i))
    shard_of = {}
    for actor_id, queue in per_actor.items():
        for k, (job, i) in enumerate(queue):
            # Each call also reads ahead the first tensors of the actor's next call.
            then = queue[k + 1][0].tensors[:2] if k + 1 < len(queue) else ()
            shard_of[actors[actor_id].write.remote(replace(job, then=then))] = i
    write_total = sum(plan.shards[i].layout.size for i in todo) * len(out.subdirs)
    progress = Progress("merge" if not reduced else "write", write_total, len(plan.shards), enabled=options.progress)
    progress.update(shards=len(records))
    written, stats, seconds = 0, {}, defaultdict(float)

    def wrote(ref, result):
        nonlocal written
        for s in result.stats:
            stats[s.name] = s
        for phase, s in result.seconds.items():
            seconds[phase] += s
        if result.refused is not None:
            _stop_and_wait(actors)
            out.discard(plan)
            _check_stats(plan, {result.refused.name: result.refused})
        written += result.nbytes
        i = shard_of[ref]
        records[i] = out.finish_shard(plan, i, result.files, result.writer)
        progress.update(result.nbytes, shards=1)

    _run(list(shard_of), wrote)
    progress.close()
    return written, stats, dict(seconds), records


def print_summary(result: MergeResult, stream=sys.stderr) -> None:
    for note in result.notes:
        print(f"note: {note}", file=stream)
    print(f"merged {result.tensors} tensors with {result.actors} actors on {result.nodes} node(s) "
          f"in {result.seconds:.1f} s "
          f"({result.bytes_written / 1e9:.2f} GB written)", file=stream)
    for label, path in result.outputs.items():
        print(f"  {'schedule ' + label if '=' in label else 't=' + label}: {path}", file=stream)
    if result.scores is not None:
        print(evaluation.describe(result.scores), file=stream)
        print(f"  best: t={evaluation.best_label(result.scores)}; table and plot: "
              f"{', '.join(result.score_files)}", file=stream)
    if result.phases:
        print("  time: " + ", ".join(f"{name} {s:.1f} s" for name, s in result.phases), file=stream)
    if result.actor_seconds:
        print(f"  actors: {split.describe(result.actor_seconds)} (summed over {result.actors} actors)", file=stream)

