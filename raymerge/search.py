"""`raymerge search`: per-layer schedules chosen on held-out text, trials run by Ray Tune.

    parents ─ plan ─ pass 1 (reductions, once) ─▶ Tune: Optuna's sampler proposes a schedule,
    a trial builds its child in memory and scores it piece by piece on the dev text (ASHA stops
    poor ones early), then on the test text ─▶ OUT/search.parquet, OUT/recipe.yml, OUT/best/

A trial costs a weighted sum per tensor and a forward pass, not a merge: pass 1's reductions do not
depend on t. Trials run in Tune's trial processes, each holding one scorer (evaluation.EvalActor);
Tune keeps those processes from trial to trial (``reuse_actors``), so a trial starts no process
and imports nothing. The first trials are the constant schedules t = 0, 0.1, ..., 1, so the search
can only improve on the best global t. The best schedule is the finished trial with the lowest dev
bits per byte; its test bits per byte are reported, never searched on.

OUT is taken for the search's life (the merge's lock). Tune's experiment state lives in
OUT/.raymerge/tune: ``--resume`` restores it (``Tuner.restore``), keeps the trials it records as
ended and runs the others; OUT/.raymerge/search.json holds what a resume must repeat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from raymerge import storage
from raymerge.errors import InputError
from raymerge.options import MergeOptions
from raymerge.search_space import SEEDED_T, SearchSpace
from raymerge.tune_files import whole_files

SAMPLERS = ("tpe", "cmaes", "random")
RESULT_FILES = ("search.parquet", "search.png", "recipe.yml")
IDENTITY_FILE = os.path.join(".raymerge", "search.json")  # under OUT
TUNE_DIR = os.path.join(".raymerge", "tune")  # under OUT; Tune's experiment is its "search"


@dataclass(frozen=True)
class SearchOptions:
    """A search: the merge options it shares with `merge` (parents, OUT, the text, placement),
    and its own."""

    merge: MergeOptions
    trials: int = 64
    parallel: int | None = None  # trials at once; None: as many as the cluster's scoring actors
    seed: int = 0
    sampler: str = "tpe"
    holdout: float = 0.3
    space: SearchSpace = field(default_factory=SearchSpace)

    def __post_init__(self):
        if self.trials < 1:
            raise InputError(f"--trials {self.trials}: a search needs at least one trial")
        if self.parallel is not None and self.parallel < 1:
            raise InputError(f"--parallel {self.parallel}: at least one trial at a time")
        if self.sampler not in SAMPLERS:
            raise InputError(f"--sampler {self.sampler}: one of {', '.join(SAMPLERS)}")
        if self.merge.eval_text is None:
            raise InputError("a search needs a text to score on (--eval TEXT)")
        if storage.is_uri(self.merge.out):
            raise InputError(f"{self.merge.out}: a search writes its OUT on a filesystem (Tune's records, the "
                             "table, the best child); to keep it in a bucket, mount the bucket (docs: clusters)")

    def identity(self, parents: list[str]) -> dict:
        """What a ``--resume`` must repeat: everything that changes the trials or their scores
        (``parents``: where the parents were found; a local text by its absolute path)."""
        m = self.merge
        text = os.path.abspath(m.eval_text) if os.path.exists(m.eval_text) else m.eval_text
        return {"parents": parents, "eval": text, "eval_column": m.eval_column, "eval_bytes": m.eval_bytes,
                "context": m.context, "holdout": self.holdout, "trials": self.trials, "seed": self.seed,
                "sampler": self.sampler, "filters": list(self.space.filters), "anchors": self.space.anchors,
                "dtype": m.dtype, "vocab": m.vocab, "pad": m.pad, "tokenizer_from": m.tokenizer_from}


@dataclass(frozen=True)
class SearchResult:
    trials: pa.Table
    best: dict  # the best finished trial's row
    best_constant: dict | None  # the best finished seeded constant's row
    parents: dict  # "A"/"B" -> (dev bits per byte, test bits per byte), on the same split
    out: str
    seconds: float


@dataclass(frozen=True)
class _Context:
    """What every trial needs, put in Ray's object store once (tune.with_parameters)."""

    plan: object
    stats: dict
    means: dict
    config: dict
    windows: object
    space: SearchSpace
    block_bytes: int
    threads: int
    use_gpu: bool


_SCORER: dict = {}  # this trial process's scorer, kept from trial to trial


def _trial(point: dict, ctx: _Context) -> None:
    """One Tune trial (run in a trial process that Tune reuses)."""
    import ray
    from ray import tune

    from raymerge.evaluation import EvalActor
    from raymerge.placement import check_reports
    from raymerge.trial import run_trial, schedule_coefficients

    scorer = _SCORER.get("scorer")
    if scorer is None:
        scorer = _SCORER["scorer"] = EvalActor(ctx.block_bytes, ctx.threads, ctx.use_gpu)
    if scorer.gpu_error:
        check_reports([scorer.where()])  # a GPU it cannot use: one line, never the CPU
    started, began = time.monotonic(), time.time()
    schedule = ctx.space.schedule(point)
    coefs = schedule_coefficients(ctx.plan, ctx.stats, schedule)
    where = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "started": began}

    def report(dev, windows, test):
        tune.report({"dev_bits_per_byte": dev, "dev_windows": windows, "test_bits_per_byte": test,
                     "seconds": time.monotonic() - started, **where})
        return True

    run_trial(scorer, "trial", ctx.plan, coefs, ctx.means, ctx.config, ctx.windows, report)


def _sampler(name: str, seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def run_search(options: SearchOptions, session=None) -> SearchResult:
    """The search, as the module says. Everything that can be refused is refused before pass 1."""
    from raymerge import driver, evaluation
    from raymerge.assemble import child_config
    from raymerge.holdout import split_windows
    from raymerge.passes import check_stats, reduce_pass
    from raymerge.placement import live_nodes, merge_shape, place, scoring_shape
    from raymerge.plan import assign_actors, build_plan
    from raymerge.recipe import write_recipe
    from raymerge.report import plot_search
    from raymerge.scoring import default_context, read_text
    from raymerge.session import RaySession

    try:
        import optuna  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError:
        raise InputError("raymerge search needs Ray Tune and Optuna: pip install 'raymerge[search]'") from None
    started = time.monotonic()
    m = options.merge
    session = session or RaySession(m.address).start()
    out_dir = None
    try:
        a, b = driver.load_parents(m)
        identity = options.identity([a.path, b.path])
        _check_output(m, identity)
        plan = build_plan((a, b), m, m.workers or os.cpu_count() or 1)
        options = dataclasses.replace(options, space=options.space.for_tensors(
            [t.name for t in plan.tensors if t.op == "slerp"]))
        for p in (a, b):
            if p.vocab is None:
                raise InputError(f"a search needs the parents' tokenizers; parent {p.label} ({p.path}) ships none")
        text = read_text(m.eval_text, m.eval_column, m.eval_bytes)
        context = m.context or default_context(a.config.text)
        windows = split_windows(evaluation.child_tokenizer(a, b, plan), text, context, options.holdout)

        out_dir = _take_output(m, identity)
        session.wait()
        shape = merge_shape(m.cluster)
        plan = assign_actors(plan, shape.count)
        pool = driver.start_actors(m.cluster, shape, plan.n_actors, keep=False)
        try:
            # Placed within --schedule-timeout, each seeing the parents, as a merge's actors are.
            place(pool, m.cluster, (plan.read_paths(),), waits=shape.waits)
            stats = reduce_pass(pool, plan.tensors, m.progress)
            check_stats(plan, stats)
        finally:
            pool.stop()
        means = {n: s.means for n, s in stats.items() if s.means}
        scoring = scoring_shape(live_nodes(), options.parallel or options.trials, plan.total_size(), m.device)
        parallel = options.parallel or scoring.count
        ctx = _Context(plan, stats, means, child_config((a, b), plan), windows, options.space, m.block_bytes, scoring.threads,
                       scoring.num_gpus > 0)
        grid = _tune(options, ctx, parallel, {"cpu": scoring.num_cpus, "gpu": scoring.num_gpus}, len(windows.dev))
        table = _table(grid, options.space)
        parents = _score_parents(a, b, text, context, options.holdout, len(windows.dev), scoring, m)
        best, best_constant = _best(table)
        os.makedirs(m.out, exist_ok=True)
        pq.write_table(table, os.path.join(m.out, "search.parquet"))

        schedule = options.space.schedule({n: best[n] for n in options.space.names()})
        with open(os.path.join(m.out, "recipe.yml"), "w") as f:
            f.write(write_recipe(a.path, b.path, schedule, m.dtype))
        plot_search(table, schedule, plan.n_layers, os.path.join(m.out, "search.png"))
        best_options = dataclasses.replace(m, out=os.path.join(m.out, "best"), t=(), schedule=schedule,
                                           eval_text=None, keep=None)
        out_dir.unlock()  # OUT/best is the best merge's own to take
        driver.merge(best_options, session)
        return SearchResult(table, best, best_constant, parents, m.out, time.monotonic() - started)
    finally:
        if out_dir is not None:
            out_dir.unlock()
        session.stop()


def _check_output(m: MergeOptions, identity: dict) -> None:
    """A new search needs a new or empty OUT; ``--resume`` one holding this search."""
    path = os.path.join(m.out, IDENTITY_FILE)
    if not m.resume:
        if os.path.exists(m.out) and os.listdir(m.out):
            raise InputError(f"{m.out} is not empty: a search writes into a new or empty directory "
                             "(--resume continues the search it holds)")
        return
    try:
        with open(path) as f:
            recorded = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{m.out} holds no search to resume ({IDENTITY_FILE} is missing)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    differ = [k for k, v in identity.items() if recorded.get(k) != json.loads(json.dumps(v))]
    if differ:
        raise InputError(f"{m.out} holds a search with other {', '.join(differ)}: refusing to resume it")


def _take_output(m: MergeOptions, identity: dict):
    """Lock OUT for the search (a second search or merge into it is refused in one line) and
    record what a resume must repeat."""
    from raymerge.outdir import OutputDir

    out_dir = OutputDir(m.out, [])
    out_dir.lock()
    path = os.path.join(m.out, IDENTITY_FILE)
    if not m.resume:
        with open(path, "w") as f:
            json.dump(identity, f, indent=1)
    return out_dir


def _score_parents(a, b, text: str, context: int, holdout: float, pieces: int, shape, m: MergeOptions) -> dict:
    """Both parents' dev and test bits per byte on the search's split of the text, each windowed
    with the parent's own tokenizer, on one scoring actor."""
    import ray

    from raymerge.evaluation import start_scorers
    from raymerge.holdout import split_text
    from raymerge.scoring import make_windows

    split = split_text(text, holdout, pieces)
    # Placed within --schedule-timeout, as every actor of a merge is; a GPU it cannot use: one
    # line, never the CPU.
    pool = start_scorers(m.cluster, shape, 1, restarts=0)
    scores = {}
    try:
        [actor] = pool.actors
        for p in (a, b):
            ray.get(actor.load_model.remote(p.label, p.path))
            bits = [ray.get(actor.score_built.remote(p.label, make_windows(p.tokenizer, part, context)))[0].bits
                    for part in (*split.dev, split.test)]
            actor.drop_child.remote(p.label)
            dev_bytes = len("".join(split.dev).encode("utf-8"))
            scores[p.label] = (sum(bits[:-1]) / dev_bytes, bits[-1] / len(split.test.encode("utf-8")))
    finally:
        pool.stop()
    return scores


def _tune(options: SearchOptions, ctx: _Context, parallel: int, resources: dict, pieces: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), resources)
    storage = os.path.abspath(os.path.join(options.merge.out, TUNE_DIR))
    experiment = os.path.join(storage, "search")
    files = whole_files()  # a kill never leaves a record cut short (tune_files.py)
    if options.merge.resume and tune.Tuner.can_restore(experiment, storage_filesystem=files):
        # Ended trials are kept; those running when the search stopped start again. The searcher,
        # the scheduler and the callbacks are Tune's, restored with the experiment.
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=files)
    else:
        shutil.rmtree(storage, ignore_errors=True)  # a search stopped before Tune recorded anything
        search = OptunaSearch(metric="dev_bits_per_byte", mode="min", points_to_evaluate=options.space.seeded(),
                              sampler=_sampler(options.sampler, options.seed))
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=pieces, grace_period=1, reduction_factor=2)
        callbacks = [_progress_callback(options.trials)] if options.merge.progress else []
        tuner = tune.Tuner(
            trainable,
            param_space={n: tune.uniform(0.0, 1.0) for n in options.space.names()},
            tune_config=tune.TuneConfig(metric="dev_bits_per_byte", mode="min", search_alg=search, scheduler=scheduler,
                                        num_samples=options.trials, max_concurrent_trials=parallel, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=storage, storage_filesystem=files, name="search", verbose=0,
                                      callbacks=callbacks),
        )
    # Tune's own tables are not printed (raymerge prints its lines). A trial restarted by a resume
    # reports again the steps its killed run had reported, which Optuna warns of.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The reported value is ignored because", module="optuna")
        grid = tuner.fit()
    if grid.errors:
        err = grid.errors[0]
        cause = getattr(err, "cause", None) or err
        raise cause if isinstance(cause, InputError) else InputError(f"a trial failed: {str(cause).strip().splitlines()[-1]}")
    return grid


def _progress_callback(total: int):
    """A Tune callback printing one line per ended trial (stderr), as --eval prints one per t."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.ended = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended += 1
            r = trial.last_result or {}
            test = r.get("test_bits_per_byte")
            how = f"test {test:.4f}" if test is not None else f"stopped early after {r.get('dev_windows')} dev windows"
            print(f"search: trial {self.ended}/{total}: dev {r.get('dev_bits_per_byte', float('nan')):.4f} bits/byte, "
                  f"{how}", file=sys.stderr, flush=True)

    return Progress()


def _table(grid, space: SearchSpace) -> pa.Table:
    """One row per trial (docs/search.md lists the columns)."""
    rows = []
    for i, result in enumerate(grid):
        metrics, config = result.metrics or {}, result.config
        values = [config[n] for n in space.names()]
        seeded = len(set(values)) == 1 and values[0] in SEEDED_T
        finished = metrics.get("test_bits_per_byte") is not None
        rows.append({"trial": metrics.get("trial_id", str(i)), "seeded_constant": seeded,
                     **{n: float(config[n]) for n in space.names()},
                     "dev_bits_per_byte": metrics.get("dev_bits_per_byte"),
                     "test_bits_per_byte": metrics.get("test_bits_per_byte"),
                     "dev_windows": metrics.get("dev_windows"), "stopped_early": not finished,
                     "seconds": metrics.get("seconds"), "started": metrics.get("started"),
                     "node": metrics.get("node"), "pid": metrics.get("pid")})
    return pa.Table.from_pylist(rows)


def _best(table: pa.Table) -> tuple[dict, dict | None]:
    finished = [r for r in table.to_pylist() if not r["stopped_early"]]
    if not finished:
        raise InputError("no trial finished: every one was stopped early")
    best = min(finished, key=lambda r: r["dev_bits_per_byte"])
    constants = [r for r in finished if r["seeded_constant"]]
    return best, (min(constants, key=lambda r: r["dev_bits_per_byte"]) if constants else None)


def print_summary(result: SearchResult, stream=None) -> None:
    stream = stream or sys.stderr
    best, const = result.best, result.best_constant
    print(f"searched {result.trials.num_rows} trials in {result.seconds:.1f} s", file=stream)
    print(f"  best schedule: dev {best['dev_bits_per_byte']:.4f}, test {best['test_bits_per_byte']:.4f} bits/byte",
          file=stream)
    for label, (dev, test) in sorted(result.parents.items()):
        print(f"  parent {label}: dev {dev:.4f}, test {test:.4f} bits/byte", file=stream)
    if const is not None:
        t = next(v for k, v in const.items() if k.endswith(".0"))
        print(f"  best constant t={t:g}: dev {const['dev_bits_per_byte']:.4f}, "
              f"test {const['test_bits_per_byte']:.4f} bits/byte", file=stream)
    print("  " + ", ".join(os.path.join(result.out, name) for name in ("best", *RESULT_FILES)), file=stream)
