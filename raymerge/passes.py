"""The driver's passes over the plan, each a set of calls to the merge actors' pool:

- ``reduce_pass``: every tensor's float64 reductions and checks, nothing written (``--eval``'s
  first pass, and ``--report``'s for shards a resume kept);
- ``write_pass``: every shard not yet finished, made and written whole by the actor that owns it,
  then recorded as finished.

Both refuse non-finite parents and differing non-float tensors (``check_stats``), naming the file
and the tensor.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from raymerge.actors import TensorStats, WriteJob
from raymerge.errors import InputError
from raymerge.outdir import OutputDir
from raymerge.plan import MergePlan, TensorPlan, chunk_by_size
from raymerge.pool import ActorPool
from raymerge.progress import Progress
from raymerge.slerp import slerp_coefficients

# Each reduce call reads about this many bytes: progress moves, a lost actor costs one call, and
# no call runs for long. A write call is one shard: its one writer.
CALL_BYTES = 256 * 2**20


@dataclass(frozen=True)
class WritePass:
    """What the write pass did."""

    bytes_written: int
    stats: dict[str, TensorStats]  # the reductions of the tensors it made (not of kept shards)
    actor_seconds: dict[str, float]  # summed over calls, per phase (timing.py)
    records: dict[int, dict]  # every shard's completion record, by shard index


def check_stats(plan: MergePlan, stats: dict[str, TensorStats]) -> None:
    """Refuse non-finite parents and differing non-float tensors, naming file and tensor."""
    for t in plan.tensors:
        s = stats.get(t.name)
        if s is None:
            continue
        for ok, entry, label in zip(s.finite, t.inputs, plan.labels):
            if not ok and entry is not None:
                who = "the base model" if label == "base" else f"parent {label}"
                raise InputError(f"{who}: {entry.file}: tensor {entry.name!r} holds NaN or inf")
        if not s.equal:
            raise InputError(f"non-float tensor {t.name!r} differs between the parents: it cannot be merged")


def coefficients(stats: dict[str, TensorStats], t_by_name: dict[str, tuple[float, ...]]) -> dict:
    """Every SLERP tensor's coefficients, one per t, from its reductions."""
    return {name: tuple(slerp_coefficients(stats[name].reductions, x) for x in ts) for name, ts in t_by_name.items()}


def reduce_pass(pool: ActorPool, tensors, show: bool, family=None) -> dict[str, TensorStats]:
    """The reductions, finiteness and equality of ``tensors``; nothing is written."""
    stats: dict[str, TensorStats] = {}
    progress = Progress("reduce", sum(t.read_bytes for t in tensors), enabled=show)
    by_actor: dict[int, list[TensorPlan]] = defaultdict(list)
    for t in tensors:
        by_actor[t.actor].append(t)
    for i, mine in by_actor.items():
        for chunk in chunk_by_size(mine, CALL_BYTES, lambda t: t.read_bytes):
            pool.submit(i, "reduce", chunk, family, tag=sum(t.read_bytes for t in chunk))

    def reduced(nbytes, values):
        for s in values:
            stats[s.name] = s
        progress.update(nbytes)

    pool.wait(reduced)
    progress.close()
    return stats


def write_pass(pool: ActorPool, plan: MergePlan, out: OutputDir, t_by_name: dict[str, tuple[float, ...]],
               show: bool, coefs: dict | None = None, means: dict | None = None) -> WritePass:
    """Make and write every shard not already finished, recording each when complete.

    A shard is one call to the actor that owns it, which writes it whole, front to back. Each
    tensor is reduced, checked and written in one read of its bytes, unless ``coefs`` (and
    ``means``) come from a first pass (``--eval``). A tensor that fails its checks stops the
    merge: the actors are stopped and every model file of this merge removed before the refusal
    is raised.
    """
    reduced = coefs is not None
    means = means or {}
    records = out.finished_shards(plan)
    todo = [i for i in range(len(plan.shards)) if i not in records]
    out.clear_unfinished(plan, set(todo))
    per_actor: dict[int, list[tuple[WriteJob, int]]] = defaultdict(list)  # actor -> (job, shard), in order
    for i in todo:
        mine = [t.name for t in plan.shard_tensors(i)]
        names = [n for n in mine if n in t_by_name]
        job = WriteJob.for_shard(plan, i, tuple(out.final_path(sub, plan.shards[i].filename) for sub in out.subdirs),
                                 ts={n: t_by_name[n] for n in names}, reduced=reduced,
                                 coefficients={n: coefs[n] for n in names} if reduced else {},
                                 means={n: means[n] for n in mine if n in means})
        per_actor[job.tensors[0].actor].append((job, i))
    for actor_id, queue in per_actor.items():
        for k, (job, i) in enumerate(queue):
            # Each call also reads ahead the first tensors of the actor's next call.
            then = queue[k + 1][0].tensors[:2] if k + 1 < len(queue) else ()
            pool.submit(actor_id, "write", replace(job, then=then), tag=i)
    write_total = sum(plan.shards[i].layout.size for i in todo) * len(out.subdirs)
    progress = Progress("write" if reduced else "merge", write_total, len(plan.shards), enabled=show)
    progress.update(shards=len(records))
    written, stats, seconds = 0, {}, defaultdict(float)

    def wrote(i, result):
        nonlocal written
        for s in result.stats:
            stats[s.name] = s
        for phase, s in result.seconds.items():
            seconds[phase] += s
        if result.refused is not None:
            pool.stop()
            out.discard(plan)
            check_stats(plan, {result.refused.name: result.refused})
        written += result.nbytes
        records[i] = out.finish_shard(plan, i, result.files, result.writer)
        progress.update(result.nbytes, shards=1)

    pool.wait(wrote)
    progress.close()
    return WritePass(written, stats, dict(seconds), records)
