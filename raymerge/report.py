"""Human-readable summaries: what a plan will do (``raymerge plan``), and the per-tensor report
of a finished merge (``--report report.parquet``, read back by ``raymerge report``)."""

from __future__ import annotations

from collections.abc import Sequence

import math
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

from raymerge.align import tied
from raymerge.options import MergeOptions
from raymerge.parents import Parent
from raymerge.plan import MergePlan
from raymerge.schedule import layer_index
from raymerge.slerp import Coefficients, Reductions


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def describe_plan(inputs: Sequence[Parent], plan: MergePlan, options: MergeOptions) -> str:
    """The plan as a user reads it: vocabularies, padding, copies, ties, tokenizer, shards, actors."""
    roles = {"A": " (t=0)", "B": " (t=1)"} if plan.family is None else {}
    lines = []
    for p in inputs:
        lines += [f"{'base model' if p.label == 'base' else 'parent ' + p.label}{roles.get(p.label, '')}: {p.path}",
                  f"  vocab_size {p.vocab_size}, {len(p.tensors)} tensors, dtype {p.dtype}, "
                  f"tied embeddings: {'yes' if tied(p) else 'no'}"]
    first = plan.labels[0]
    lines += [
        ("t: " if plan.family is None else "method: ") + ", ".join(options.t_labels()),
        f"output: {len(plan.tensors)} tensors, dtype {plan.out_dtype}, vocab_size {plan.vocab_size}, "
        f"tied embeddings: {'yes' if plan.tied_output else 'no'}, "
        + (f"tokenizer: {first}'s tokens, then the others' (union)" if plan.token_map and plan.token_map.mode == "union"
           else f"tokenizer from parent {plan.tokenizer_from.upper()}"),
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


def tensor_report(plan: MergePlan, reductions: dict[str, Reductions],
                  coefficients: dict[str, tuple[Coefficients, ...]], t_by_name: dict[str, tuple[float, ...]]) -> pa.Table:
    """One row per output tensor: angle between the parents, fallback, norms, padding, copies."""
    rows = []
    for t in plan.tensors:
        red = reductions.get(t.name, Reductions())
        coefs = coefficients.get(t.name, ())
        rows.append({
            "name": t.name, "shape": list(t.shape), "op": t.op,
            "t": list(t_by_name.get(t.name, ())),
            "angle_deg": math.degrees(coefs[0].theta) if coefs else None,
            "linear_fallback": any(c.linear for c in coefs) if coefs else None,
            "norm_a": math.sqrt(red.aa) if t.a is not None else None,
            "norm_b": math.sqrt(red.bb) if t.b is not None else None,
            "padded_rows": t.pad.k if t.pad else 0,
            "pad_strategy": t.pad.strategy if t.pad else None,
            "copied_from": t.op[-1] if t.op in ("copy_a", "copy_b") else None,
        })
    return pa.Table.from_pylist(rows)


def describe_report(path: str) -> str:
    """What a user wants from a report: angles by layer, fallbacks, padding, copies."""
    rows = pq.read_table(path).to_pylist()
    merged = [r for r in rows if r["angle_deg"] is not None]
    lines = [f"{len(rows)} tensors, {len(merged)} SLERPed"]
    by_layer: dict = defaultdict(list)
    for r in merged:
        by_layer[layer_index(r["name"])].append(r["angle_deg"])
    lines.append("mean angle between the parents, by layer (degrees):")
    for layer in sorted(by_layer, key=lambda x: (x is not None, x if x is not None else -1)):
        angles = by_layer[layer]
        label = "outside layers" if layer is None else f"layer {layer}"
        lines.append(f"  {label:>14}: {sum(angles) / len(angles):7.2f}  (max {max(angles):.2f}, {len(angles)} tensors)")
    fallbacks = [r["name"] for r in merged if r["linear_fallback"]]
    lines.append(f"linear fallbacks: {len(fallbacks)}" + (f" ({', '.join(fallbacks[:5])}{', ...' if len(fallbacks) > 5 else ''})" if fallbacks else ""))
    padded = [r for r in rows if r["padded_rows"]]
    lines.append(f"padded tensors: {len(padded)}")
    for r in padded:
        lines.append(f"  {r['name']}: {r['padded_rows']} rows ({r['pad_strategy']})")
    copied = [r for r in rows if r["copied_from"]]
    lines.append(f"copied from one parent: {len(copied)}")
    for r in copied:
        lines.append(f"  {r['name']}: from parent {r['copied_from'].upper()}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(table: pa.Table, path: str) -> list[float]:
    """``sweep.png``: bits per byte against t, the parents as horizontal lines, the best t marked.

    Returns the t of every point drawn."""
    plt = _pyplot()
    rows = table.to_pylist()
    children = sorted((r for r in rows if r["kind"] == "child" and r["t"] is not None), key=lambda r: r["t"])
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if children:
        ax.plot([r["t"] for r in children], [r["bits_per_byte"] for r in children], "o-", color="tab:blue",
                label="child")
        best = min(children, key=lambda r: (r["bits_per_byte"], r["t"]))
        ax.plot([best["t"]], [best["bits_per_byte"]], "*", markersize=16, color="tab:red",
                label=f"best t={best['name']}")
    for r, color in zip((r for r in rows if r["kind"] == "parent"), ("tab:green", "tab:orange")):
        ax.axhline(r["bits_per_byte"], linestyle="--", color=color, label=f"parent {r['name']}")
    ax.set_xlabel("t (0 = parent A, 1 = parent B)")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the same scores give the same file
    plt.close(fig)
    return [r["t"] for r in children]


def plot_angles(report_path: str, path: str) -> None:
    """The angle between the parents per layer and module (a report's ``angle_deg``), with the
    tensors where SLERP fell back to linear marked: what one looks at to choose a schedule."""
    plt = _pyplot()
    rows = [r for r in pq.read_table(report_path).to_pylist() if r["angle_deg"] is not None]
    modules: dict = defaultdict(list)
    for r in rows:
        layer = layer_index(r["name"])
        if layer is None:
            continue
        module = r["name"].split(f".{layer}.", 1)[-1].removesuffix(".weight").removesuffix(".bias")
        modules[module].append((layer, r["angle_deg"], r["linear_fallback"]))
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=100)
    for module in sorted(modules):
        points = sorted(modules[module])
        ax.plot([p[0] for p in points], [p[1] for p in points], ".-", label=module)
        linear = [p for p in points if p[2]]
        if linear:
            ax.plot([p[0] for p in linear], [p[1] for p in linear], "x", color="black")
    ax.set_xlabel("layer")
    ax.set_ylabel("angle between the parents (degrees); x = linear fallback")
    if modules:
        ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def plot_search(table: pa.Table, schedule, n_layers: int, path: str) -> list[float]:
    """``search.png``: left, the best dev bits per byte so far against trials (every finished
    trial a point), the best constant t as a line; right, the best schedule's t per layer for each
    filter and the default. Returns the curve of best-so-far values drawn."""
    from raymerge.schedule import evaluate

    plt = _pyplot()
    rows = table.to_pylist()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=100)
    best_so_far, best, xs, ys = [], float("inf"), [], []
    for i, r in enumerate(rows, 1):
        if not r["stopped_early"]:
            best = min(best, r["dev_bits_per_byte"])
            xs.append(i)
            ys.append(r["dev_bits_per_byte"])
        best_so_far.append(best)
    left.plot(xs, ys, ".", color="tab:gray", label="finished trial")
    left.step(range(1, len(rows) + 1), best_so_far, where="post", color="tab:blue", label="best so far")
    constants = [r for r in rows if r["seeded_constant"] and not r["stopped_early"]]
    if constants:
        c = min(constants, key=lambda r: r["dev_bits_per_byte"])
        left.axhline(c["dev_bits_per_byte"], linestyle="--", color="tab:orange",
                     label=f"best constant t={c['default.0']:g}")
    left.set_xlabel("trial")
    left.set_ylabel("dev bits per byte (lower is better)")
    left.legend(fontsize="small")
    layers = list(range(n_layers))
    for name, values in (*schedule.filters, ("default", schedule.default)):
        right.plot(layers, [evaluate(values, i / (n_layers - 1) if n_layers > 1 else 1.0) for i in layers], ".-",
                   label=name)
    right.set_xticks(layers)
    right.set_xlabel("layer")
    right.set_ylabel("t of the best schedule (0 = A, 1 = B)")
    right.set_ylim(-0.05, 1.05)
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return best_so_far
