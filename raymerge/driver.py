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

import json
import os
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from raymerge import evaluation, storage, timing
from raymerge.actors import remote_actor_class
from raymerge.assemble import assemble
from raymerge.family import METHODS
from raymerge.options import ClusterOptions, MergeOptions
from raymerge.outdir import OutputDir
from raymerge.parents import Parent, load_parent
from raymerge.passes import check_stats, coefficients, reduce_pass, write_pass
from raymerge.placement import ActorShape, check_reports, merge_shape, place
from raymerge.plan import MergePlan, assign_actors, build_plan
from raymerge.pool import ActorPool
from raymerge.report import tensor_report
from raymerge.session import RaySession
from raymerge.tokens import input_letter


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
    actor_seconds: dict[str, float] = field(default_factory=dict)  # summed over the actors' calls (timing.py)


@dataclass(frozen=True)
class Choice:
    """The outputs a merge writes: all of them, or those ``--eval`` kept (with its scores)."""

    indices: tuple[int, ...]  # into options.t_labels() and options.output_dirs()
    scores: pa.Table | None = None


def load_parents(options: MergeOptions) -> tuple[Parent, ...]:
    """What the merge reads, in the plan's input order: the parents (A, B, C, ...), then the
    SLERP family's base model."""
    labels = [input_letter(i).upper() for i in range(len(options.parents))] + (["base"] if options.base else [])
    return tuple(load_parent(spec, label) for spec, label in zip(options.inputs, labels))


def merge(options: MergeOptions, session: RaySession | None = None) -> MergeResult:
    """Merge two parents as ``options`` says and return what was written.

    ``session``: Ray, already starting (the CLI starts it before importing this module);
    by default the merge starts its own, which comes up while the parents are read and planned.
    Everything that can be refused from the inputs alone is refused before OUT is touched; OUT is
    then held (a lock) until the merge ends.

    Example:
        >>> merge(MergeOptions(a="parent-a", b="parent-b", out="child", t=(0.5,)))  # doctest: +SKIP
    """
    started = time.monotonic()
    phases = timing.Phases()
    session = session or RaySession(options.address).start()
    try:
        inputs = load_parents(options)
        out = OutputDir(options.out, options.output_dirs())
        out.check_target([p.where for p in inputs])
        plan = build_plan(inputs, options, options.workers or os.cpu_count() or 1)
        out.lock()
        try:
            return _merge_into(out, inputs, plan, options, session, phases, started)
        finally:
            out.unlock()
    finally:
        session.stop()


def _merge_into(out: OutputDir, inputs: tuple[Parent, ...], plan: MergePlan, options: MergeOptions,
                session: RaySession, phases: timing.Phases, started: float) -> MergeResult:
    """The merge, once OUT is held: check it, plan the actors, (score), write, assemble."""
    a, b = inputs[:2]
    fingerprint = plan.fingerprint(options)
    out.check_existing(fingerprint, options.resume, options.overwrite)
    t_by_name = {t.name: options.t_for(t.name, plan.n_layers) for t in plan.tensors if t.op in ("slerp", "mix")}
    if plan.family is not None:
        for weights in {w for ws in t_by_name.values() for w in ws}:
            plan.family.check_weights(weights)
    eval_inputs = evaluation.prepare(options.scoring, a, b, plan) if options.scoring else None
    phases.lap("plan")

    session.wait()
    phases.lap("start Ray")
    shape = merge_shape(options.cluster)
    plan = assign_actors(plan, shape.count)
    pool = start_actors(options.cluster, shape, plan.n_actors, keep=not session.owns_ray)
    try:
        placed = place(pool, options.cluster, (plan.read_paths(), out.probe_dir()), out.probe_dir(), waits=shape.waits)
        phases.lap("start actors")
        choice, coefs, means = Choice(tuple(range(len(options.t_labels())))), None, {}
        if eval_inputs is not None:
            # Scoring needs every tensor's coefficients before anything is written: a first pass
            # reduces them all, and the write pass takes the chosen children's coefficients.
            stats = reduce_pass(pool, plan.tensors, options.progress)
            check_stats(plan, stats)
            phases.lap("read + reduce")
            # The scoring actors need the CPUs (or GPUs) the merge actors hold.
            pool.stop()
            coefs, means = coefficients(stats, t_by_name), {n: s.means for n, s in stats.items() if s.means}
            choice = _score_and_choose(options, plan, eval_inputs, a, b, coefs, means)
            pool = start_actors(options.cluster, shape, plan.n_actors, keep=not session.owns_ray)
            phases.lap("score")
        kept = choice.indices
        out = out.keeping([out.subdirs[i] for i in kept])
        t_by_name = {name: tuple(ts[i] for i in kept) for name, ts in t_by_name.items()}
        coefs = {name: tuple(c[i] for i in kept) for name, c in coefs.items()} if coefs is not None else None

        out.create(fingerprint, options.overwrite)
        check_reports(pool.gather("where", [], out.state_dir), out.root)
        done = write_pass(pool, plan, out, t_by_name, options.progress, coefs, means)
        if options.report:
            _write_report(options, plan, pool, done.stats, t_by_name)
    except BaseException:
        # Interrupted or failed: stop the actors, and wait until their calls have ended, so that
        # nobody writes while the unfinished shards go (finished ones stay for --resume).
        pool.stop()
        out.remove_unfinished(plan)
        raise
    pool.release()
    # With --eval, the tensors were read and reduced before scoring: this is the writing.
    phases.lap("write" if options.eval_text else "merge")
    session.stop()
    phases.lap("stop Ray")

    outputs = {}
    labels = options.t_labels()
    for i, sub in zip(kept, out.subdirs):
        shards = {plan.shards[k].filename: {**r["files"][sub], "writer": r["writer"]}
                  for k, r in sorted(done.records.items())}
        out.write_output(sub, lambda d, label=labels[i], shards=shards:
                         assemble(d, inputs, plan, options, label, fingerprint, shards))
        outputs[labels[i]] = out.output_path(sub)
    score_files = ()
    if choice.scores is not None:
        out.write_output("", lambda d: evaluation.write_results(d, choice.scores))
        score_files = tuple(out.final_path("", name) for name in evaluation.RESULT_FILES)
    out.cleanup()
    phases.lap("assemble")
    return MergeResult(outputs, len(plan.tensors), done.bytes_written, time.monotonic() - started,
                       plan.n_actors, len({info["node"] for info in placed}), plan.notes, tuple(phases.seconds.items()),
                       choice.scores, score_files, actor_seconds=done.actor_seconds)


def start_actors(options: ClusterOptions, shape: ActorShape, count: int, keep: bool) -> ActorPool:
    """The merge actors. ``keep``: this process keeps its Ray after the merge (the caller's own
    ray.init: a Python session, a test suite), so they may be kept for its next merge (pool.py)."""
    runtime_env = storage.actor_runtime_env(options.object_storage)
    actor_cls = remote_actor_class(shape.num_cpus, shape.num_gpus, runtime_env)
    key = ("MergeActor", shape, options.block_bytes, json.dumps(runtime_env, sort_keys=True))
    return ActorPool(actor_cls, count, options.block_bytes, shape.threads, shape.num_gpus > 0, owns_process=True,
                     keep_for=key if keep else None)


def _score_and_choose(options: MergeOptions, plan: MergePlan, inputs, a: Parent, b: Parent,
                      coefs: dict, means: dict) -> Choice:
    """Score every child (and both parents); the children ``--keep`` writes."""
    labels = options.t_labels()
    scores = evaluation.evaluate(options.cluster, plan, inputs, a, b, coefs, means, labels)
    kept = set(evaluation.kept_labels(scores, options.scoring.keep))
    return Choice(tuple(i for i, label in enumerate(labels) if label in kept), scores)


def _write_report(options: MergeOptions, plan: MergePlan, pool: ActorPool, stats: dict,
                  t_by_name: dict[str, tuple[float, ...]]) -> None:
    """``--report``: the per-tensor Parquet report (tensors in shards a resume kept are reduced
    for it)."""
    stats = dict(stats)
    missing = [t for t in plan.tensors if t.name not in stats]
    if missing:
        stats.update(reduce_pass(pool, missing, options.progress))
    os.makedirs(os.path.dirname(os.path.abspath(options.report)), exist_ok=True)
    pq.write_table(tensor_report(plan, {n: s.reductions for n, s in stats.items()},
                                 coefficients(stats, t_by_name), t_by_name), options.report)


def print_summary(result: MergeResult, stream=None) -> None:
    """The summary a merge ends with, on ``stream`` (default: the stderr of the moment)."""
    stream = stream or sys.stderr
    for note in result.notes:
        print(f"note: {note}", file=stream)
    print(f"merged {result.tensors} tensors with {result.actors} actors on {result.nodes} node(s) "
          f"in {result.seconds:.1f} s "
          f"({result.bytes_written / 1e9:.2f} GB written)", file=stream)
    for label, path in result.outputs.items():
        if not label.startswith(METHODS):  # the SLERP family's labels name their method
            label = f"schedule {label}" if "=" in label else f"t={label}"
        print(f"  {label}: {path}", file=stream)
    if result.scores is not None:
        print(evaluation.describe(result.scores), file=stream)
        print(f"  best: t={evaluation.best_label(result.scores)}; table and plot: "
              f"{', '.join(result.score_files)}", file=stream)
    if result.phases:
        print("  time: " + ", ".join(f"{name} {s:.1f} s" for name, s in result.phases), file=stream)
    if result.actor_seconds:
        print(f"  actors: {timing.describe(result.actor_seconds)} (summed over {result.actors} actors)", file=stream)

