"""Human-readable summaries: what a plan will do (``raymerge plan``)."""

from __future__ import annotations

from raymerge.align import tied
from raymerge.options import MergeOptions
from raymerge.parents import Parent
from raymerge.plan import MergePlan


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def describe_plan(a: Parent, b: Parent, plan: MergePlan, options: MergeOptions) -> str:
    """The plan as a user reads it: vocabularies, padding, copies, ties, tokenizer, shards, actors."""
    lines = [
        f"parent A (t=0): {a.path}",
        f"  vocab_size {a.vocab_size}, {len(a.tensors)} tensors, dtype {a.dtype}, "
        f"tied embeddings: {'yes' if tied(a) else 'no'}",
        f"parent B (t=1): {b.path}",
        f"  vocab_size {b.vocab_size}, {len(b.tensors)} tensors, dtype {b.dtype}, "
        f"tied embeddings: {'yes' if tied(b) else 'no'}",
        f"t: {', '.join(options.t_labels())}",
        f"output: {len(plan.tensors)} tensors, dtype {plan.out_dtype}, vocab_size {plan.vocab_size}, "
        f"tied embeddings: {'yes' if plan.tied_output else 'no'}, tokenizer from parent {plan.tokenizer_from.upper()}",
    ]
    padded = [t for t in plan.tensors if t.pad is not None]
    lines.append(f"padded tensors: {len(padded) or 'none'}")
    for t in padded:
        p = t.pad
        lines.append(f"  {t.name}: parent {p.short.upper()} {p.n} -> {p.N} rows on axis {p.axis} ({p.strategy})")
    copied = [t for t in plan.tensors if t.op in ("copy_a", "copy_b")]
    lines.append(f"copied from one parent: {len(copied) or 'none'}")
    for t in copied:
        lines.append(f"  {t.name}: only in parent {t.op[-1].upper()}")
    lines.append(f"shards: {len(plan.shards)}")
    for s in plan.shards:
        lines.append(f"  {s.filename}: {len(s.tensors)} tensors, {_mb(s.layout.size)}")
    lines.append(f"actors: {plan.n_actors}")
    for i, load in enumerate(plan.actor_bytes()):
        lines.append(f"  actor {i}: {_mb(load)} read + written")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
