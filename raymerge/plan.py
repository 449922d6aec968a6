"""The merge plan: one row per output tensor, its sources, its shard and offset, and its actor.

The plan is built by the driver from headers only, before any tensor data is read, and is the
single description every actor works from. It is deterministic: the same parents and options
give the same plan, hence the same shard layout and byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pyarrow as pa

from raymerge import storage
from raymerge.align import Alignment, PadSpec, align_inputs, align_parents
from raymerge.configs import compare_configs
from raymerge.errors import InputError
from raymerge.family import FamilyMethod
from raymerge.options import DTYPE_CHOICES, MergeOptions
from raymerge.parents import Parent
from raymerge.shards import FLOAT_DTYPES, ShardLayout, TensorEntry, itemsize, layout_shard, numel
from raymerge.tokens import RowMap, TokenMap

INDEX_NAME = "model.safetensors.index.json"
# Shards are the unit of parallel writing (one writer each): a model is cut into this many, as
# long as each holds at least MIN_SHARD_BYTES (a file per few hundred MB keeps every storage's
# per-file costs small next to its bytes).
PARALLEL_SHARDS = 32
MIN_SHARD_BYTES = 256 * 10**6


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is made.

    op is "slerp" (both parents), "copy_a" / "copy_b" (present in one parent only: copied and
    cast), "equal" (a non-float tensor that must be identical in every input: copied), or "mix"
    (the SLERP family: a weighted sum of every input, ``inputs``, from their Gram matrix).
    """

    name: str
    op: str
    shape: tuple[int, ...]
    dtype: str
    a: TensorEntry | None
    b: TensorEntry | None
    pad: PadSpec | None = None
    rowmap: RowMap | None = field(default=None, compare=False)  # rows aligned by token string
    shard: int = -1
    offset: int = -1
    actor: int = -1
    more: tuple[TensorEntry, ...] = ()  # the third and later inputs (the SLERP family; a base last)

    @property
    def inputs(self) -> tuple[TensorEntry | None, ...]:
        """Every input's entry, in the plan's input order (None where a parent lacks the tensor)."""
        return (self.a, self.b, *self.more)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)

    @property
    def read_bytes(self) -> int:
        return sum(e.nbytes for e in self.inputs if e is not None)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    layout: ShardLayout
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class MergePlan:
    tensors: tuple[TensorPlan, ...]
    shards: tuple[ShardPlan, ...]
    n_actors: int
    out_dtype: str
    vocab_size: int | None
    tied_output: bool
    tokenizer_from: str  # the letter of the input whose tokenizer files are copied: "a", "b", ...
    n_layers: int
    notes: tuple[str, ...] = field(default=())
    pad: str = "gradient"  # the pad (or, by token string, fill) strategy in force
    token_map: TokenMap | None = field(default=None, compare=False)
    family: FamilyMethod | None = None  # the SLERP family's method; None: two-parent SLERP
    labels: tuple[str, ...] = ("A", "B")  # the inputs, in order, for messages

    def actor_bytes(self) -> list[int]:
        load = [0] * self.n_actors
        for t in self.tensors:
            load[t.actor] += t.read_bytes + t.nbytes
        return load

    def shard_tensors(self, i: int) -> tuple[TensorPlan, ...]:
        """Shard ``i``'s tensors in file order: the order its one writer writes them."""
        return tuple(sorted((t for t in self.tensors if t.shard == i), key=lambda t: t.offset))

    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def read_paths(self) -> list[str]:
        """The parents' weight files the actors read (each actor checks it sees them)."""
        return sorted({e.file for t in self.tensors for e in t.inputs if e is not None})

    def to_table(self) -> pa.Table:
        """The plan as a pyarrow table (one row per output tensor), e.g. to save as Parquet."""
        rows = []
        for t in self.tensors:
            pad = t.pad
            rows.append({
                "name": t.name, "op": t.op, "shape": list(t.shape), "dtype": t.dtype,
                "a_file": t.a.file if t.a else None, "a_shape": list(t.a.shape) if t.a else None,
                "a_dtype": t.a.dtype if t.a else None,
                "b_file": t.b.file if t.b else None, "b_shape": list(t.b.shape) if t.b else None,
                "b_dtype": t.b.dtype if t.b else None,
                "more_files": [e.file for e in t.more],
                "shard": self.shards[t.shard].filename, "offset": t.offset, "nbytes": t.nbytes,
                "actor": t.actor,
                "pad_axis": pad.axis if pad else None, "pad_short": pad.short if pad else None,
                "pad_n": pad.n if pad else None, "pad_N": pad.N if pad else None,
                "pad_strategy": pad.strategy if pad else (t.rowmap.fill if t.rowmap else None),
                "by_token": t.rowmap is not None,
            })
        return pa.Table.from_pylist(rows)

    def fingerprint(self, options: MergeOptions) -> str:
        """A digest of everything that decides the output bytes, used to refuse a foreign resume."""
        def stat(i: int) -> list:
            # Per input, in order: A and B swapped is another merge (t=0.3 becomes t=0.7).
            files = sorted({t.inputs[i].file for t in self.tensors if len(t.inputs) > i and t.inputs[i]})
            return [(f, storage.size(f), storage.mtime_ns(f)) for f in files]

        data = {
            "files_a": stat(0), "files_b": stat(1), "t": list(options.t),
            "schedule": options.schedule.describe() if options.schedule else None,
            "dtype": self.out_dtype, "pad": self.pad,
            "token_map": self.token_map.digest() if self.token_map else None,
            "shards": [(s.filename, hashlib.sha256(s.layout.header).hexdigest()) for s in self.shards],
            "tokenizer_from": self.tokenizer_from,
        }
        if self.family is not None:
            data["family"] = repr(self.family)
            data["inputs"] = [stat(i) for i in range(2, len(self.labels))]
            data["weights"] = [[w.describe() for w in ws] for ws in options.weights]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def natural_key(name: str) -> list:
    """Sort ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def shard_filenames(n: int) -> list[str]:
    """``model.safetensors`` for one shard, else transformers' ``model-0000i-of-0000n.safetensors``."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def chunk_by_size(items: list, limit: int, cost) -> list[list]:
    """Consecutive items in groups of at most ``limit`` total ``cost`` (an item larger than the
    limit gets a group of its own): shards by bytes, actor calls by bytes.

    Example:
        >>> chunk_by_size([3, 3, 5, 1], 6, lambda x: x)
        [[3, 3], [5, 1]]
    """
    groups: list[list] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + cost(item) > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += cost(item)
    return groups


def shard_limit(total: int, max_shard_size: int) -> int:
    """Bytes a shard may hold: the model's size alone decides it, never the number of actors.

    Each shard is written by one actor, so the layout bounds a merge's parallelism: a model is
    cut into ``PARALLEL_SHARDS`` shards, fewer when they would be smaller than
    ``MIN_SHARD_BYTES``, more when they would be larger than ``max_shard_size``.

    Example:
        >>> shard_limit(14_500_000_000, 5_000_000_000)  # a 7B model in bf16: 32 shards
        453125000
        >>> shard_limit(40_000_000, 5_000_000_000)  # a tiny one: one shard
        40000000
    """
    count = max(-(-total // max_shard_size), min(PARALLEL_SHARDS, total // MIN_SHARD_BYTES), 1)
    return min(max_shard_size, -(-total // count))


def _assign_shards(shards: list[tuple[int, int]], n_actors: int) -> dict[int, int]:
    """Whole shards to actors, (shard, bytes) longest first, each to the least-loaded actor."""
    load = [0] * n_actors
    owner = {}
    for shard, nbytes in sorted(shards, key=lambda s: (-s[1], s[0])):
        i = min(range(n_actors), key=lambda k: (load[k], k))
        owner[shard] = i
        load[i] += nbytes
    return owner


# Float8 checkpoints store each weight with scale tensors (per tensor, row or block) that SLERP
# of the raw values would ignore: refused, naming the tensor, rather than merged wrong.
FP8_DTYPES = ("F8_E5M2", "F8_E4M3")


def _tensor_plans(aligned: Alignment, out_dtype: str, labels: tuple[str, ...], family: bool) -> list[TensorPlan]:
    plans = []
    for item in aligned.tensors:
        entries = (item.a, item.b, *item.more)
        src = next(e for e in entries if e is not None)
        for e, label in zip(entries, labels):
            if e is not None and e.dtype in FP8_DTYPES:
                raise InputError(f"parent {label}: {e.file}: tensor {item.name!r} is {e.dtype} (float8): FP8 "
                                 "checkpoints, whose weights come with scale tensors, cannot be merged by SLERP; "
                                 "merge the parents' bf16 or fp16 weights")
        if src.dtype not in FLOAT_DTYPES:
            if item.a is None or item.b is None:
                op = "copy_a" if item.a else "copy_b"
            else:
                for e, label in zip(entries[1:], labels[1:]):
                    if e.dtype != src.dtype or e.shape != src.shape:
                        raise InputError(
                            f"non-float tensor {item.name!r} differs between the parents: "
                            f"{labels[0]} {src.dtype}{list(src.shape)}, {label} {e.dtype}{list(e.shape)}"
                        )
                op = "equal"
            plans.append(TensorPlan(item.name, op, item.shape, src.dtype, item.a, item.b, more=item.more))
            continue
        if family:
            op = "mix"
        else:
            op = "slerp" if item.a is not None and item.b is not None else ("copy_a" if item.a else "copy_b")
        plans.append(TensorPlan(item.name, op, item.shape, out_dtype, item.a, item.b, item.pad, item.rowmap,
                                more=item.more))
    return plans


def build_plan(inputs: Sequence[Parent], options: MergeOptions, n_actors: int) -> MergePlan:
    """Build the whole plan from the inputs' headers, configs and tokenizers and the options:
    two parents for SLERP, or the SLERP family's parents and base (``MergeOptions.inputs``).

    Raises InputError before any work when the configs or the tensors cannot be merged.
    """
    a = inputs[0]
    labels = tuple(p.label for p in inputs)
    config_notes = []
    for p in inputs[1:]:
        config_notes += compare_configs(a.config, p.config, (a.label, p.label))
    out_dtype = DTYPE_CHOICES[options.dtype] if options.dtype else a.dtype
    if options.family is None:
        aligned = align_parents(a, inputs[1], options.vocab, options.pad)
    else:
        aligned = align_inputs(list(inputs), options.vocab, options.pad)
    if aligned.token_map is not None and options.tokenizer_from is not None:
        raise InputError("--tokenizer-from applies to rows matched by id; with rows aligned by token "
                         "string, --vocab decides the tokenizer")
    plans = _tensor_plans(aligned, out_dtype, labels, options.family is not None)
    limit = shard_limit(sum(t.nbytes for t in plans), options.max_shard_size)
    groups = chunk_by_size(sorted(plans, key=lambda t: natural_key(t.name)), limit, lambda t: t.nbytes)
    names = shard_filenames(len(groups))
    final: list[TensorPlan] = []
    shards = []
    for i, group in enumerate(groups):
        layout = layout_shard([(t.name, t.dtype, t.shape) for t in group])
        shards.append(ShardPlan(names[i], layout, tuple(t.name for t in group)))
        for t in group:
            final.append(replace(t, shard=i, offset=layout.offsets[t.name][0]))
    pad = next((t.pad.strategy for t in final if t.pad), None) or (aligned.token_map.fill if aligned.token_map else
                                                                 options.pad or "gradient")
    plan = MergePlan(
        tensors=tuple(final), shards=tuple(shards), n_actors=1, out_dtype=out_dtype,
        vocab_size=aligned.vocab_size, tied_output=aligned.tied_output,
        tokenizer_from=options.tokenizer_from or aligned.tokenizer_from, n_layers=a.num_layers,
        notes=tuple(config_notes) + aligned.notes, pad=pad, token_map=aligned.token_map,
        family=options.family, labels=labels,
    )
    return assign_actors(plan, n_actors)


def assign_actors(plan: MergePlan, n_actors: int) -> MergePlan:
    """The same plan with its shards balanced by bytes (read and written) across ``n_actors``
    actors (at most one per shard): each shard's tensors go to the one actor that writes it."""
    n_actors = max(1, min(n_actors, len(plan.shards)))
    load = defaultdict(int)
    for t in plan.tensors:
        load[t.shard] += t.read_bytes + t.nbytes
    owner = _assign_shards(sorted(load.items()), n_actors)
    return replace(plan, n_actors=n_actors, tensors=tuple(replace(t, actor=owner[t.shard]) for t in plan.tensors))
