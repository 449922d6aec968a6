"""The ``raymerge`` command line: builds MergeOptions and hands them to the driver."""

from __future__ import annotations

import os
import shlex
import signal
import sys

import click

from raymerge.errors import InputError, RaymergeError
from raymerge.options import (DEFAULT_SIZES, DEVICE_CHOICES, DTYPE_CHOICES, PAD_STRATEGIES, VOCAB_MODES, MergeOptions,
                              parse_size)
from raymerge.family import METHODS, FamilyMethod
from raymerge.schedule import Schedule, parse_range, parse_t_for, parse_values
from raymerge.session import RaySession


def _fail(err: Exception, debug: bool, expected: bool = True) -> None:
    if debug:
        raise err
    # An error raised in an actor comes back wrapped by Ray, remote traceback and all: show the
    # original exception's own message.
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, OSError) and cause.strerror:
        text = f"{cause.filename}: {cause.strerror}" if cause.filename else cause.strerror
    else:
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if not expected:  # no check foresaw it: say what it was, and where the rest is
        text = f"{type(cause).__name__}: {text} (rerun with --debug for the traceback)"
    click.echo(f"raymerge: error: {text}", err=True)
    sys.exit(1)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_guarded(debug: bool, fn):
    # `ray job stop` and schedulers send SIGTERM: stop as cleanly as on Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return fn()
    except (RaymergeError, OSError) as e:  # OSError: unreadable input, full or read-only output
        _fail(e, debug)
    except KeyboardInterrupt:
        click.echo("raymerge: interrupted; finished shards are kept: rerun with --resume to continue", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - a Ray failure or a bug: still one line and exit 1
        _fail(e, debug, expected=False)
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group()
@click.version_option(package_name="raymerge")
def main():
    """SLERP-merge Hugging Face causal language models (two by SLERP, more by its family), distributed over Ray."""


def _apply(f, decorators):
    for d in reversed(decorators):
        f = d(f)
    return f


def run_options(f):
    """How a merge runs and where it writes: shared by `merge` and `run`."""
    return _apply(f, [
        click.option("-o", "--out", required=True, help="Output directory."),
        click.option("--max-shard-size", default=DEFAULT_SIZES["max_shard_size"], show_default=True,
                     help="Largest output shard, e.g. 500MB, 5GB, 2GiB."),
        click.option("--vocab", type=click.Choice(VOCAB_MODES), default=None,
                     help="Vocabulary alignment: auto (by id when one tokenizer extends the other, else "
                          "union), union (A's tokens, then B's others), a or b (that parent's tokenizer), "
                          "the last three matching rows by token string. Default: auto (a recipe's "
                          "tokenizer_source, with `run`)."),
        click.option("--pad", type=click.Choice(PAD_STRATEGIES), default=None,
                     help="How the shorter vocabulary is extended (default gradient); by token string, "
                          "how a token a parent lacks is filled (default copy: the other parent's row)."),
        click.option("--tokenizer-from", type=click.Choice(["a", "b"]), default=None,
                     help="Parent to take tokenizer files from (default: the one with the merged vocabulary)."),
        click.option("--workers", type=int, default=None,
                     help="Number of actors (default: one per CPU, or one per GPU on a GPU cluster)."),
        click.option("--device", type=click.Choice(DEVICE_CHOICES), default=MergeOptions.device, show_default=True,
                     help="Where actors compute: auto (GPUs where the cluster has them, else CPUs), cpu "
                          "(CPU actors even on GPU nodes) or gpu."),
        click.option("--gpus-per-actor", type=float, default=MergeOptions.gpus_per_actor, show_default=True,
                     help="GPUs each GPU actor asks for, at most 1 (0.5: two actors share a GPU)."),
        click.option("--block-size", default=DEFAULT_SIZES["block_bytes"], show_default=True,
                     help="Row block each CPU actor streams, as float32 bytes: 1MiB keeps temporaries in "
                          "CPU cache (GPU actors use at least 64MiB). Never changes an output byte."),
        click.option("--address", default=None,
                     help="Ray cluster to attach to ('auto', 'ray://host:10001', host:port). "
                          "Default: RAY_ADDRESS if set, else an embedded local Ray."),
        click.option("--schedule-timeout", type=click.FloatRange(min=0, min_open=True),
                     default=MergeOptions.schedule_timeout_s, show_default=True,
                     help="Seconds the actors may wait for resources (an autoscaler adding nodes) before "
                          "the merge stops."),
        click.option("--resume", is_flag=True, help="Continue an interrupted merge into OUT."),
        click.option("--overwrite", is_flag=True, help="Replace an earlier raymerge output in OUT."),
        click.option("--quiet", is_flag=True, help="No progress output."),
        click.option("--report", default=None,
                     help="Write a per-tensor report (angle, fallback, norms, padding) as Parquet."),
        click.option("--eval", "eval_text", default=None,
                     help="Score every t and both parents on this text (.txt, .jsonl, .parquet): bits per "
                          "byte and perplexity; writes OUT/sweep.parquet and OUT/sweep.png."),
        click.option("--keep", default=None,
                     help="With --eval: which children are written: best (default), all, or N (the N best)."),
        click.option("--eval-bytes", default=DEFAULT_SIZES["eval_bytes"], show_default=True,
                     help="Score the text's first bytes only."),
        click.option("--eval-column", default=MergeOptions.eval_column, show_default=True,
                     help="The text field of a .jsonl, or column of a .parquet."),
        click.option("--context", type=int, default=None,
                     help="Tokens per scoring window (default: the model's context, at most 2048)."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ])


def t_options(f):
    """Parents, t and the SLERP family's method: shared by `merge` and `plan`."""
    return _apply(f, [
        click.argument("parents", nargs=-1, required=True),
        click.option("-t", "t_values", type=float, multiple=True,
                     help="Interpolation factor in [0, 1] (0 = A, 1 = B), default 0.5. Repeat for a sweep. "
                          "With --t-for, the default for unmatched tensors (none: every tensor must "
                          "match a filter)."),
        click.option("--t-range", default=None, help="A sweep START:STOP:STEP, both ends included."),
        click.option("--t-for", "t_for", multiple=True,
                     help="Per-layer schedule FILTER=V or FILTER=V0,V1,... (repeatable, first match wins)."),
        click.option("--dtype", type=click.Choice(list(DTYPE_CHOICES)), default=None,
                     help="Output dtype (default: parent A's)."),
        click.option("--method", type=click.Choice(["slerp", *METHODS]), default="slerp", show_default=True,
                     help="slerp (two parents, -t), or a SLERP-family method over the parents, with mergekit's "
                          "default parameters: multislerp (2 or more, --weights, --base), nuslerp (2, --weights, "
                          "--base) or karcher (2 or more). A recipe (`raymerge run`) sets their parameters."),
        click.option("--base", default=None,
                     help="multislerp and nuslerp: a base model; the parents are merged as task vectors against it."),
        click.option("--weights", "weights", multiple=True,
                     help="multislerp and nuslerp: one weight per parent, W1,W2,... (default: all 1). Repeat for "
                          "a sweep into OUT/w-<weights>, made from one read of the parents."),
    ])


# The command line's names for MergeOptions' fields, where they differ (sizes are parsed).
_RENAMED = {"block_size": "block_bytes", "schedule_timeout": "schedule_timeout_s"}
_SIZES = ("max_shard_size", "block_bytes", "eval_bytes")


def build_options(*, out: str, parents: tuple[str, ...] = (), a: str | None = None, b: str | None = None,
                  t_values=(), t_range=None, t_for=(), quiet: bool = False, debug: bool = False,
                  method: str = "slerp", weights=(), **values) -> MergeOptions:
    """MergeOptions from the command line's values: an option not given (None) keeps
    MergeOptions' default (``debug`` is the CLI's own business). The parents come as
    ``parents`` (the command line's arguments) or as ``a`` and ``b``."""
    parents = tuple(parents) or tuple(p for p in (a, b) if p is not None)
    if len(parents) < 2:
        raise InputError(f"give at least two parents to merge; got {len(parents)}")
    if method == "slerp" and len(parents) > 2:
        raise InputError(f"slerp merges two parents; for {len(parents)}, choose --method multislerp or karcher")
    if method != "slerp" and "family" not in values:
        values["family"] = FamilyMethod(method, base=values.get("base") is not None)
    if weights:  # the command line's W1,W2,... (or a recipe's schedules, taken as they are)
        values["weights"] = tuple(tuple(Schedule((w,), kind="weight") for w in parse_values(ws, "--weights"))
                                  if isinstance(ws, str) else ws for ws in weights)
    a, b, values["more"] = parents[0], parents[1], parents[2:]
    t = tuple(t_values) + (parse_range(t_range) if t_range else ())
    if t_for:
        if len(t) > 1:
            raise InputError("--t-for takes at most one -t (the default), not a sweep")
        values["schedule"] = parse_t_for(t_for, t)
    elif values.get("schedule") is None and not t:
        t = (0.5,)
    fields = {_RENAMED.get(k, k): v for k, v in values.items() if v is not None}
    for key in _SIZES:
        if key in fields:
            fields[key] = parse_size(fields[key])
    return MergeOptions(a=a, b=b, out=out, t=t, progress=not quiet, **fields,
                        command=" ".join(shlex.quote(x) for x in ["raymerge", *sys.argv[1:]]))


@main.command()
@t_options
@run_options
def merge(**values):
    """Merge parents A (t=0) and B (t=1) into OUT by SLERP, or two or more parents by a SLERP-family
    method (--method multislerp, nuslerp, karcher)."""

    def go():
        options = build_options(**values)
        # Ray starts while the driver's modules are imported and the parents planned.
        with RaySession(options.address) as session:
            from raymerge.driver import merge as run_merge, print_summary

            print_summary(run_merge(options, session))

    _run_guarded(values["debug"], go)


@main.command()
@t_options
@click.option("--vocab", type=click.Choice(VOCAB_MODES), default=None,
              help="Vocabulary alignment (see `raymerge merge --help`).")
@click.option("--pad", type=click.Choice(PAD_STRATEGIES), default=None, help="Pad or fill strategy.")
@click.option("--tokenizer-from", type=click.Choice(["a", "b"]), default=None)
@click.option("--max-shard-size", default=DEFAULT_SIZES["max_shard_size"], show_default=True)
@click.option("--workers", type=int, default=None, help="Number of actors the plan is balanced over.")
@click.option("--save", "save_path", default=None,
              help="Write the plan table as Parquet (and, with rows aligned by token string, the token "
                   "map next to it as NAME.tokens.parquet).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def plan(save_path, **values):
    """Show what merging A and B would do, reading headers only (no tensor data, no Ray)."""

    def go():
        import pyarrow.parquet as pq

        from raymerge.driver import load_parents
        from raymerge.plan import build_plan
        from raymerge.report import describe_plan

        options = build_options(out="(plan)", **values)
        inputs = load_parents(options)
        the_plan = build_plan(inputs, options, options.workers or os.cpu_count() or 1)
        click.echo(describe_plan(inputs, the_plan, options))
        if save_path:
            pq.write_table(the_plan.to_table(), save_path)
            click.echo(f"plan table written to {save_path}")
            if the_plan.token_map is not None:
                tokens_path = token_map_path(save_path)
                pq.write_table(the_plan.token_map.to_table(), tokens_path)
                click.echo(f"token map written to {tokens_path}")

    _run_guarded(values["debug"], go)


def token_map_path(plan_path: str) -> str:
    """``plan.parquet`` -> ``plan.tokens.parquet``: the token map sits next to the plan."""
    stem = plan_path[:-len(".parquet")] if plan_path.endswith(".parquet") else plan_path
    return f"{stem}.tokens.parquet"


@main.command("run")
@click.argument("recipe")
@run_options
def run_recipe(recipe, **values):
    """Merge as a mergekit RECIPE (YAML) says: slerp (models, base_model, parameters.t), or
    multislerp, nuslerp, karcher (models and their weights, base_model, the method's parameters);
    dtype, out_dtype, tokenizer_source."""

    def go():
        from raymerge.parents import load_parent
        from raymerge.recipe import check_layer_range, load_recipe

        r = load_recipe(recipe)
        if r.layer_range is not None:
            check_layer_range(r, load_parent(r.a, "A").num_layers, load_parent(r.b, "B").num_layers)
        for note in r.notes:
            click.echo(f"note: {note}", err=True)
        options = build_options(**r.merge_values(), **{**values, "vocab": values["vocab"] or r.vocab})
        with RaySession(options.address) as session:
            from raymerge.driver import merge as run_merge, print_summary

            print_summary(run_merge(options, session))

    _run_guarded(values["debug"], go)


# The options of `merge` that a search takes, with the same meaning.
_SEARCH_SHARED = ("--out", "--max-shard-size", "--vocab", "--pad", "--tokenizer-from", "--workers", "--device",
                  "--gpus-per-actor", "--block-size", "--address", "--schedule-timeout", "--quiet", "--eval-bytes",
                  "--eval-column", "--context", "--debug", "--resume")


def search_options(f):
    """`merge`'s options a search shares (see _SEARCH_SHARED), taken from run_options."""
    def keep(param):
        return any(name in _SEARCH_SHARED for name in param.opts)

    f = run_options(f)
    f.__click_params__ = [p for p in f.__click_params__ if keep(p)]
    return f


@main.command("search")
@click.argument("a")
@click.argument("b")
@click.option("--eval", "eval_text", required=True,
              help="The text searched on (.txt, .jsonl, .parquet): split into dev (searched) and test (reported).")
@click.option("--trials", type=int, default=64, show_default=True, help="Schedules to try (the first 11 are t = 0, 0.1, ..., 1).")
@click.option("--parallel", type=int, default=None,
              help="Trials at once (default: as many as the cluster's scoring actors).")
@click.option("--sampler", type=click.Choice(["tpe", "cmaes", "random"]), default="tpe", show_default=True,
              help="Optuna's sampler proposing schedules.")
@click.option("--seed", type=int, default=0, show_default=True, help="The sampler's seed.")
@click.option("--holdout", type=float, default=0.3, show_default=True,
              help="Fraction of the text held out as test (its end), never searched on.")
@click.option("--filter", "filters", multiple=True,
              help="A substring of tensor names with a gradient of its own (repeatable; default: self_attn, mlp).")
@click.option("--anchors", type=int, default=5, show_default=True, help="Values per gradient, spread over the layers.")
@click.option("--dtype", type=click.Choice(list(DTYPE_CHOICES)), default=None, help="Output dtype (default: parent A's).")
@search_options
def search_cmd(trials, parallel, sampler, seed, holdout, filters, anchors, **values):
    """Search per-layer SLERP schedules for A (t=0) and B (t=1) on held-out text, with Ray Tune;
    writes OUT/search.parquet, OUT/search.png, OUT/recipe.yml and the best child, OUT/best."""

    def go():
        from raymerge.search_space import DEFAULT_FILTERS, SearchSpace

        space = SearchSpace(tuple(filters) or DEFAULT_FILTERS, anchors, given=bool(filters))
        options = build_options(**values)
        with RaySession(options.address) as session:
            from raymerge.search import SearchOptions, print_summary, run_search

            search = SearchOptions(options, trials=trials, parallel=parallel, seed=seed, sampler=sampler,
                                   holdout=holdout, space=space)
            print_summary(run_search(search, session))

    _run_guarded(values["debug"], go)


@main.command("verify")
@click.argument("out")
@click.option("--load", is_flag=True, help="Also load the model with transformers and run a forward pass.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def verify_cmd(out, load, debug):
    """Check a merged model directory: shards, index, finiteness, vocabulary, provenance."""

    def go():
        from raymerge.verify import verify

        problems = verify(out, load=load)
        for p in problems:
            click.echo(f"problem: {p}", err=True)
        if problems:
            sys.exit(1)
        click.echo(f"{out}: ok")

    _run_guarded(debug, go)


@main.command("report")
@click.argument("path")
@click.option("--plot", "plot_path", default=None,
              help="Draw the angle between the parents per layer and module (linear fallbacks marked) as PNG.")
def report_cmd(path, plot_path):
    """Summarise a per-tensor report written by `raymerge merge --report PATH`."""
    from raymerge.report import describe_report, plot_angles

    try:
        click.echo(describe_report(path))
        if plot_path:
            plot_angles(path, plot_path)
            click.echo(f"plot written to {plot_path}")
    except (OSError, ValueError, KeyError) as e:  # missing file, not Parquet, not a raymerge report
        click.echo(f"raymerge: error: {path}: cannot read the report ({e})", err=True)
        sys.exit(1)


def run(args: list[str] | None = None) -> int:
    """Run one command line (``args``, default ``sys.argv[1:]``) and return its exit status.

    click's own refusals (a missing option, a value of the wrong type) become one
    ``raymerge: error:`` line and exit status 1, like every other bad input. Tests call this
    in-process; ``entry`` is the console script around it.
    """
    try:
        result = main(args=args, prog_name="raymerge", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `raymerge`: the help, as click shows it
            print(e.format_message())
            return 0
        command = e.ctx.command_path if e.ctx is not None else "raymerge"
        message = " ".join(e.format_message().split())
        print(f"raymerge: error: {message} (see '{command} --help')", file=sys.stderr)
        return 1
    except click.ClickException as e:
        print(f"raymerge: error: {' '.join(e.format_message().split())}", file=sys.stderr)
        return 1
    except click.Abort:  # Ctrl-C at a prompt click owns
        return 130
    except SystemExit as e:  # commands end this way on errors and interrupts
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1


def entry() -> None:
    """The console entry point: ``run``, then an exit that skips teardown.

    With torch imported, Python's own teardown takes a noticeable fraction of a second after the
    work is done; by then the merge is complete, Ray is shut down and every file is closed, so
    the process flushes its output and leaves at once.
    """
    code = run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
