"""The evaluation driver: score every t of a sweep, and both parents, on held-out text (``--eval``).

Between the two passes of a merge, once the coefficients of every t are known, evaluation actors
build each child in memory from the parents and those coefficients (the same blocks pass 2
writes, so the same bits a written child has), load it with transformers and score it with the
protocol in scoring.py. Nothing is written to be scored. The driver then writes only the children
that ``--keep`` asks for, and the table and plot of all scores.

Everything that can be refused is refused before Ray starts: the text is read and tokenized with
the children's and the parents' tokenizers first.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import pyarrow as pa
import ray
import torch

from raymerge import storage
from raymerge.actors import MergeActor
from raymerge.errors import InputError
from raymerge.options import ClusterOptions, ScoringOptions
from raymerge.parents import Parent
from raymerge.placement import ActorShape, cuda_problem, live_nodes, place, scoring_shape
from raymerge.plan import MergePlan
from raymerge.pool import ActorPool
from raymerge.scoring import Score, Windows, default_context, make_windows, read_text, score
from raymerge.slerp import Coefficients


@dataclass(frozen=True)
class EvalInputs:
    """The windows each tokenizer gives, and what a child is loaded from."""

    child: Windows
    parents: dict[str, Windows]  # "A", "B"
    child_config: dict
    context: int


def prepare(options: ScoringOptions, a: Parent, b: Parent, plan: MergePlan) -> EvalInputs:
    """Read and tokenize the evaluation text before any work: every refusal happens here."""
    from raymerge.assemble import child_config

    for p in (a, b):
        if p.vocab is None:
            raise InputError(f"--eval needs the parents' tokenizers; parent {p.label} ({p.path}) ships none")
    text = read_text(options.text, options.column, options.max_bytes)
    child_tok = child_tokenizer(a, b, plan)
    context = options.context or default_context(a.config.text)
    return EvalInputs(
        child=make_windows(child_tok, text, context),
        parents={p.label: make_windows(p.tokenizer, text, context) for p in (a, b)},
        child_config=child_config((a, b), plan), context=context,
    )


def child_tokenizer(a: Parent, b: Parent, plan: MergePlan):
    """The children's tokenizer: the union's, or the parent's whose files they take (loaded once,
    with the vocabulary)."""
    from raymerge.tokens import union_tokenizer

    if plan.token_map is not None and plan.token_map.mode == "union":
        return union_tokenizer(a.path, plan.token_map)
    return (a if plan.tokenizer_from == "a" else b).tokenizer


class EvalActor:
    """Builds children in memory and scores them; scores parents loaded from their directories."""

    def __init__(self, block_bytes: int, num_threads: int, use_gpu: bool = False):
        self.merger = MergeActor(block_bytes, num_threads)
        self.num_threads = num_threads
        # Like a merge actor: a GPU it was given but cannot use is reported (where), never
        # replaced by the CPU.
        self.gpu_error = cuda_problem() if use_gpu else None
        self.device = torch.device("cuda") if use_gpu and self.gpu_error is None else torch.device("cpu")
        self._models: dict[str, torch.nn.Module] = {}  # build_child's and load_model's, by key

    def where(self) -> dict:
        """This actor's host, node and the GPU problem it has, if any (placement.check_reports)."""
        return {**self.merger.where([]), "gpu_error": self.gpu_error}

    def score_child(self, plan: MergePlan, coefficients: dict[str, Coefficients], means: dict,
                    config: dict, windows: Windows) -> tuple[Score, float, float]:
        """Score the child whose coefficients per tensor are ``coefficients``;
        (score, seconds to build it, seconds to score it)."""
        started = time.monotonic()
        model = self._build(plan, coefficients, means, config)
        built = time.monotonic()
        result = score(model, windows)
        return result, built - started, time.monotonic() - built

    def build_child(self, key: str, plan: MergePlan, coefficients: dict[str, Coefficients], means: dict,
                    config: dict) -> float:
        """Build a child (as ``score_child`` does) and keep it under ``key`` for ``score_built``:
        a search trial scores one child piece by piece. Returns the seconds it took."""
        started = time.monotonic()
        self._models[key] = self._build(plan, coefficients, means, config)
        return time.monotonic() - started

    def score_built(self, key: str, windows: Windows) -> tuple[Score, float]:
        """The child kept under ``key``, scored on ``windows``; (score, seconds)."""
        started = time.monotonic()
        torch.set_num_threads(self.num_threads)
        return score(self._models[key], windows), time.monotonic() - started

    def load_model(self, key: str, path: str) -> float:
        """Load a model (a parent) from its directory with transformers and keep it under ``key``
        for ``score_built``. Returns the seconds it took."""
        started = time.monotonic()
        self._models[key] = self._load(path)
        return time.monotonic() - started

    def drop_child(self, key: str) -> None:
        self._models.pop(key, None)

    def _build(self, plan: MergePlan, coefficients: dict[str, Coefficients], means: dict, config: dict):
        torch.set_num_threads(self.num_threads)
        state = {t.name: self.merger.merged_tensor(t, coefficients.get(t.name), means.get(t.name))
                 for t in plan.tensors}
        return load_child(config, state).to(self.device)

    def _load(self, path: str):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(self.num_threads)
        return AutoModelForCausalLM.from_pretrained(path).to(self.device)

    def score_parent(self, path: str, windows: Windows) -> tuple[Score, float, float]:
        """Score a parent, loaded by transformers from its directory; (score, load s, score s)."""
        started = time.monotonic()
        model = self._load(path)
        loaded = time.monotonic()
        return score(model, windows), loaded - started, time.monotonic() - loaded


def load_child(config: dict, state: dict[str, torch.Tensor]):
    """A model from a config dict and an in-memory state dict, converted as transformers converts
    a checkpoint (so a child scores as its written files would load)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    values = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = AutoConfig.for_model(config["model_type"], **values)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    model = model_class.from_pretrained(None, config=hf_config, state_dict=state)
    model.eval()
    return model


def evaluate(options: ClusterOptions, plan: MergePlan, inputs: EvalInputs, a: Parent, b: Parent,
             coefficients: dict[str, tuple[Coefficients, ...]], means: dict, labels: list[str]) -> pa.Table:
    """Score every output (one per label) and both parents on Ray actors; return the table."""
    shape = scoring_shape(live_nodes(), len(labels) + 2, plan.total_size(), options.device)
    pool = start_scorers(options, shape, shape.count, restarts=1)
    rows = []

    def scored(task, result):
        (kind, label), (value, build_s, score_s) = task, result
        rows.append(_row(kind, label, value, build_s, score_s))
        if options.progress:
            name = f"t={label}" if kind == "child" else f"parent {label}"
            print(f"eval: {name}: {value.bits_per_byte:.4f} bits/byte, perplexity {value.perplexity:.3f} "
                  f"(built in {build_s:.1f} s, scored in {score_s:.1f} s)", file=sys.stderr, flush=True)

    try:
        plan_ref, child_windows = ray.put(plan), ray.put(inputs.child)
        for i, label in enumerate(labels):
            coefs = {name: c[i] for name, c in coefficients.items()}
            pool.submit(i % shape.count, "score_child", plan_ref, coefs, means, inputs.child_config, child_windows,
                        tag=("child", label))
        for j, p in enumerate((a, b)):
            pool.submit((len(labels) + j) % shape.count, "score_parent", p.path, inputs.parents[p.label],
                        tag=("parent", p.label))
        pool.wait(scored)
    finally:
        pool.stop()
    order = {label: i for i, label in enumerate(labels)}
    rows.sort(key=lambda r: (r["kind"] != "parent", r["name"] if r["kind"] == "parent" else order[r["name"]]))
    return pa.Table.from_pylist(rows)


def start_scorers(options: ClusterOptions, shape: ActorShape, count: int, restarts: int) -> ActorPool:
    """``count`` scoring actors of ``shape`` (each restarted up to ``restarts`` times), placed
    within --schedule-timeout and able to use their device; else one InputError, and none is
    left running."""
    actor_cls = ray.remote(num_cpus=shape.num_cpus, num_gpus=shape.num_gpus, max_restarts=restarts,
                           max_task_retries=restarts,
                           runtime_env=storage.actor_runtime_env(options.object_storage))(EvalActor)
    pool = ActorPool(actor_cls, count, options.block_bytes, shape.threads, shape.num_gpus > 0)
    try:
        place(pool, options)
    except BaseException:
        pool.stop()
        raise
    return pool


def _row(kind: str, label: str, result: Score, build_s: float, score_s: float) -> dict:
    t = None
    if kind == "child":
        try:
            t = float(label)
        except ValueError:  # a schedule
            t = None
    return {"kind": kind, "name": label, "t": t, "bits_per_byte": result.bits_per_byte,
            "perplexity": result.perplexity, "tokens": result.n_tokens, "bytes": result.n_bytes,
            "windows": result.windows, "seconds": build_s + score_s, "build_seconds": build_s,
            "score_seconds": score_s}


def kept_labels(table: pa.Table, keep: str) -> list[str]:
    """The children ``--keep`` writes: ``all``, ``best`` or the N best (lowest bits per byte)."""
    children = [r for r in table.to_pylist() if r["kind"] == "child"]
    if keep == "all":
        return [r["name"] for r in children]
    n = 1 if keep == "best" else int(keep)
    ranked = sorted(children, key=lambda r: (r["bits_per_byte"], r["t"] if r["t"] is not None else 0.0))
    return [r["name"] for r in ranked[:n]]


def best_label(table: pa.Table) -> str:
    return kept_labels(table, "best")[0]


RESULT_FILES = ("sweep.parquet", "sweep.png")


def write_results(out_root: str, table: pa.Table) -> tuple[str, str]:
    """``OUT/sweep.parquet`` and ``OUT/sweep.png`` (RESULT_FILES) in a local directory."""
    import pyarrow.parquet as pq

    from raymerge.report import plot_sweep

    parquet, png = (os.path.join(out_root, name) for name in RESULT_FILES)
    pq.write_table(table, parquet)
    plot_sweep(table, png)
    return parquet, png


def describe(table: pa.Table) -> str:
    """The table the summary prints, the best t named, and where the scoring time went."""
    best = best_label(table)
    rows = table.to_pylist()
    lines = ["  scores (bits per byte, lower is better; perplexity per token):"]
    for r in table.to_pylist():
        name = f"parent {r['name']}" if r["kind"] == "parent" else f"t={r['name']}"
        mark = "  <- best" if r["kind"] == "child" and r["name"] == best else ""
        lines.append(f"    {name:<12} {r['bits_per_byte']:.4f}  {r['perplexity']:10.3f}{mark}")
    lines.append(f"  scoring, summed over actors: models built (children) or loaded (parents) in "
                 f"{sum(r['build_seconds'] for r in rows):.1f} s, scored in {sum(r['score_seconds'] for r in rows):.1f} s")
    return "\n".join(lines)
