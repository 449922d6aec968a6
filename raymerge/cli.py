"""The ``raymerge`` command line: builds MergeOptions and hands them to the driver."""

from __future__ import annotations

import os
import shlex
import signal
import sys

import click

from raymerge.errors import InputError, RaymergeError
from raymerge.options import DTYPE_CHOICES, PAD_STRATEGIES, MergeOptions, parse_size
from raymerge.schedule import parse_range, parse_t_for
from raymerge.tokens import VOCAB_MODES


def _fail(err: Exception, debug: bool) -> None:
    if debug:
        raise err
    # An error raised in an actor comes back wrapped by Ray, remote traceback and all: show the
    # original exception's own message.
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, OSError) and cause.strerror:
        text = f"{cause.filename}: {cause.strerror}" if cause.filename else cause.strerror
    else:
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    click.echo(f"raymerge: error: {text}", err=True)
    sys.exit(1)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_guarded(debug: bool, fn):
    # `ray job stop` and schedulers send SIGTERM: stop as cleanly as on Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return fn()
    except (RaymergeError, OSError) as e:  # OSError: unreadable input, full or read-only output
        _fail(e, debug)
    except KeyboardInterrupt:
        click.echo("raymerge: interrupted; finished shards are kept: rerun with --resume to continue", err=True)
        sys.exit(130)


@click.group()
@click.version_option(package_name="raymerge")
def main():
    """SLERP-merge two Hugging Face causal language models, distributed over Ray."""


def merge_options(f):
    """Options shared by `merge` and `plan`."""
    decorators = [
        click.argument("a"),
        click.argument("b"),
        click.option("-t", "t_values", type=float, multiple=True,
                     help="Interpolation factor in [0, 1] (0 = A, 1 = B). Repeat for a sweep. "
                          "With --t-for, the default for unmatched tensors."),
        click.option("--t-range", default=None, help="A sweep START:STOP:STEP, both ends included."),
        click.option("--t-for", "t_for", multiple=True,
                     help="Per-layer schedule FILTER=V or FILTER=V0,V1,... (repeatable, first match wins)."),
        click.option("--dtype", type=click.Choice(list(DTYPE_CHOICES)), default=None,
                     help="Output dtype (default: parent A's)."),
        click.option("--max-shard-size", default="5GB", show_default=True,
                     help="Largest output shard, e.g. 500MB, 5GB, 2GiB."),
        click.option("--vocab", type=click.Choice(VOCAB_MODES), default="auto", show_default=True,
                     help="Vocabulary alignment: auto (by id when one tokenizer extends the other, else "
                          "union), union (A's tokens, then B's others), a or b (that parent's tokenizer), "
                          "the last three matching rows by token string."),
        click.option("--pad", type=click.Choice(PAD_STRATEGIES), default=None,
                     help="How the shorter vocabulary is extended (default gradient); by token string, "
                          "how a token a parent lacks is filled (default copy: the other parent's row)."),
        click.option("--tokenizer-from", type=click.Choice(["a", "b"]), default=None,
                     help="Parent to take tokenizer files from (default: the one with the merged vocabulary)."),
        click.option("--workers", type=int, default=None,
                     help="Number of actors (default: one per CPU, or one per GPU on a GPU cluster)."),
        click.option("--gpus-per-actor", type=float, default=1.0, show_default=True),
        click.option("--block-size", default="1MiB", show_default=True,
                     help="Row block each actor streams, as float32 bytes: 1MiB keeps temporaries in "
                          "CPU cache; a different size may change the last bit of some values."),
        click.option("--address", default=None,
                     help="Ray cluster to attach to ('auto', 'ray://host:10001', host:port). "
                          "Default: RAY_ADDRESS if set, else an embedded local Ray."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def build_options(a, b, out, t_values, t_range, t_for, dtype, max_shard_size, pad, tokenizer_from,
                  workers, gpus_per_actor, block_size, address, resume=False, overwrite=False,
                  progress=True, schedule=None, report=None, vocab="auto") -> MergeOptions:
    t = tuple(t_values) + (parse_range(t_range) if t_range else ())
    if t_for:
        if len(t) > 1:
            raise InputError("--t-for takes at most one -t (the default), not a sweep")
        schedule = parse_t_for(t_for, t)
    elif schedule is None and not t:
        t = (0.5,)
    return MergeOptions(
        a=a, b=b, out=out, t=t, schedule=schedule, dtype=dtype,
        max_shard_size=parse_size(max_shard_size), workers=workers, address=address,
        gpus_per_actor=gpus_per_actor, block_bytes=parse_size(block_size), pad=pad, vocab=vocab,
        tokenizer_from=tokenizer_from, resume=resume,
        overwrite=overwrite, progress=progress, report=report,
        command=" ".join(shlex.quote(x) for x in ["raymerge", *sys.argv[1:]]),
    )


@main.command()
@merge_options
@click.option("-o", "--out", required=True, help="Output directory.")
@click.option("--resume", is_flag=True, help="Continue an interrupted merge into OUT.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier raymerge output in OUT.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--report", "report_path", default=None,
              help="Write a per-tensor report (angle, fallback, norms, padding) as Parquet.")
def merge(a, b, out, t_values, t_range, t_for, dtype, max_shard_size, vocab, pad, tokenizer_from, workers,
          gpus_per_actor, block_size, address, debug, resume, overwrite, quiet, report_path):
    """Merge parents A (t=0) and B (t=1) into OUT by SLERP."""

    def run():
        from raymerge.driver import merge as run_merge, print_summary

        options = build_options(a, b, out, t_values, t_range, t_for, dtype, max_shard_size, pad,
                                tokenizer_from, workers, gpus_per_actor, block_size, address, resume,
                                overwrite, not quiet, report=report_path, vocab=vocab)
        print_summary(run_merge(options))

    _run_guarded(debug, run)


@main.command()
@merge_options
@click.option("--save", "save_path", default=None,
              help="Write the plan table as Parquet (and, with rows aligned by token string, the token "
                   "map next to it as NAME.tokens.parquet).")
def plan(a, b, t_values, t_range, t_for, dtype, max_shard_size, vocab, pad, tokenizer_from, workers,
         gpus_per_actor, block_size, address, debug, save_path):
    """Show what merging A and B would do, reading headers only (no tensor data, no Ray)."""

    def run():
        import os

        import pyarrow.parquet as pq

        from raymerge.driver import load_parents
        from raymerge.plan import build_plan
        from raymerge.report import describe_plan

        options = build_options(a, b, "(plan)", t_values, t_range, t_for, dtype, max_shard_size, pad,
                                tokenizer_from, workers, gpus_per_actor, block_size, address, vocab=vocab)
        pa_, pb_ = load_parents(options)
        the_plan = build_plan(pa_, pb_, options, options.workers or os.cpu_count() or 1)
        click.echo(describe_plan(pa_, pb_, the_plan, options))
        if save_path:
            pq.write_table(the_plan.to_table(), save_path)
            click.echo(f"plan table written to {save_path}")
            if the_plan.token_map is not None:
                tokens_path = token_map_path(save_path)
                pq.write_table(the_plan.token_map.to_table(), tokens_path)
                click.echo(f"token map written to {tokens_path}")

    _run_guarded(debug, run)


def token_map_path(plan_path: str) -> str:
    """``plan.parquet`` -> ``plan.tokens.parquet``: the token map sits next to the plan."""
    stem = plan_path[:-len(".parquet")] if plan_path.endswith(".parquet") else plan_path
    return f"{stem}.tokens.parquet"


@main.command()
@click.argument("recipe")
@click.option("-o", "--out", required=True, help="Output directory.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--pad", type=click.Choice(PAD_STRATEGIES), default=None)
@click.option("--workers", type=int, default=None)
@click.option("--gpus-per-actor", type=float, default=1.0, show_default=True)
@click.option("--block-size", default="1MiB", show_default=True)
@click.option("--address", default=None)
@click.option("--resume", is_flag=True)
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True)
@click.option("--debug", is_flag=True)
def run(recipe, out, max_shard_size, pad, workers, gpus_per_actor, block_size, address, resume, overwrite,
        quiet, debug):
    """Merge as a mergekit slerp RECIPE (YAML) says: models, base_model, parameters.t, dtype."""

    def go():
        from raymerge.driver import merge as run_merge, print_summary
        from raymerge.parents import load_parent
        from raymerge.recipe import check_layer_range, load_recipe

        r = load_recipe(recipe)
        check_layer_range(r, load_parent(r.a, "A").num_layers, load_parent(r.b, "B").num_layers)
        options = build_options(r.a, r.b, out, (), None, (), r.dtype, max_shard_size, pad, None, workers,
                                gpus_per_actor, block_size, address, resume, overwrite, not quiet,
                                schedule=r.schedule, vocab=r.vocab)
        print_summary(run_merge(options))

    _run_guarded(debug, go)


@main.command("verify")
@click.argument("out")
@click.option("--load", is_flag=True, help="Also load the model with transformers and run a forward pass.")
def verify_cmd(out, load):
    """Check a merged model directory: shards, index, finiteness, vocabulary, provenance."""
    from raymerge.verify import verify

    problems = verify(out, load=load)
    for p in problems:
        click.echo(f"problem: {p}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{out}: ok")


@main.command("report")
@click.argument("path")
def report_cmd(path):
    """Summarise a per-tensor report written by `raymerge merge --report PATH`."""
    from raymerge.report import describe_report

    try:
        click.echo(describe_report(path))
    except (OSError, ValueError) as e:  # missing file, not Parquet, not a raymerge report
        click.echo(f"raymerge: error: {path}: cannot read the report ({e})", err=True)
        sys.exit(1)


def run() -> None:
    """The console entry point: the command, then an exit that skips the interpreter's teardown.

    With torch imported, Python's own teardown takes 0.3-0.5 s after the work is done (measured
    here); by then the merge is complete, Ray is shut down and every file is closed, so the
    process flushes its output and leaves at once.
    """
    try:
        main()
        code = 0
    except SystemExit as e:  # click ends every command this way
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
