"""raymerge: SLERP-merge two Hugging Face causal language models, distributed over Ray."""

from __future__ import annotations

__version__ = "0.1.0"


def merge(a: str, b: str, out: str, t: float | list[float] = 0.5, **options):
    """Merge parents ``a`` (t=0) and ``b`` (t=1) into ``out``; the same code path as the CLI.

    Args:
        a, b: the parents: model directories, Hugging Face hub ids or bucket URIs (s3://, gs://).
        out: output directory (``out/t-<t>`` per value when ``t`` is a list).
        t: one interpolation factor, or several for a sweep.
        **options: any other field of ``raymerge.options.MergeOptions`` (dtype, workers, ...).

    Returns:
        A ``MergeResult`` (outputs by t, tensor count, bytes written, seconds; with
        ``eval_text=...``, ``scores``: the table of bits per byte by t and for both parents).

    Example:
        >>> import raymerge
        >>> raymerge.merge("parent-a", "parent-b", "child", t=0.5)  # doctest: +SKIP
    """
    from raymerge.driver import merge as run_merge
    from raymerge.options import DEFAULT_SIZES, MergeOptions, parse_size

    ts = tuple(float(x) for x in t) if isinstance(t, (list, tuple)) else (float(t),)
    for key in DEFAULT_SIZES:  # sizes as the command line takes them: "500MB", or bytes
        if key in options:
            options[key] = parse_size(options[key])
    return run_merge(MergeOptions(a=a, b=b, out=out, t=ts, progress=options.pop("progress", False), **options))
