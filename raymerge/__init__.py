"""raymerge: SLERP-merge Hugging Face causal language models, distributed over Ray."""

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
    ts = tuple(float(x) for x in t) if isinstance(t, (list, tuple)) else (float(t),)
    return _run(a=a, b=b, out=out, t=ts, **options)


def merge_family(parents: list[str], out: str, method: str, base: str | None = None,
                 weights: list[float] | list[list[float]] | None = None, **options):
    """Merge two or more ``parents`` into ``out`` by ``multislerp``, ``nuslerp`` or ``karcher``;
    the same code path as ``raymerge merge --method``.

    Args:
        parents: the parents, in order (model directories, hub ids or bucket URIs).
        out: output directory (``out/w-<weights>`` per weight vector when ``weights`` is a list
            of them).
        method: ``multislerp``, ``nuslerp`` or ``karcher``, with mergekit's default parameters;
            pass ``family=raymerge.family.FamilyMethod(method, ...)`` in ``options`` for others.
        base: a base model (multislerp, nuslerp): the parents are merged as task vectors.
        weights: one weight per parent (default: all 1), or a list of such vectors: a sweep.
        **options: any other field of ``raymerge.options.MergeOptions`` (dtype, workers, ...).

    Example:
        >>> import raymerge
        >>> raymerge.merge_family(["ft-1", "ft-2", "ft-3"], "child", "multislerp", base="base",
        ...                       weights=[1, 2, 1])  # doctest: +SKIP
    """
    from raymerge.family import FamilyMethod
    from raymerge.schedule import Schedule

    if len(parents) < 2:
        from raymerge.errors import InputError

        raise InputError(f"give at least two parents to merge; got {len(parents)}")
    vectors = [] if not weights else ([weights] if not isinstance(weights[0], (list, tuple)) else weights)
    options.setdefault("family", FamilyMethod(method, base=base is not None))
    return _run(a=parents[0], b=parents[1], more=tuple(parents[2:]), base=base, out=out,
                weights=tuple(tuple(Schedule((float(w),), kind="weight") for w in ws) for ws in vectors), **options)


def _run(**fields):
    """The merge of ``MergeOptions(**fields)``, with sizes as the command line takes them
    ("500MB", or bytes) and no progress lines unless asked for."""
    from raymerge.driver import merge as run_merge
    from raymerge.options import DEFAULT_SIZES, MergeOptions, parse_size

    for key in DEFAULT_SIZES:
        if key in fields:
            fields[key] = parse_size(fields[key])
    fields.setdefault("progress", False)
    return run_merge(MergeOptions(**fields))
