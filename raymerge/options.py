"""MergeOptions: the one frozen description of a merge, built by the CLI or the Python API."""

from __future__ import annotations

from dataclasses import dataclass, field

from raymerge import storage
from raymerge.errors import InputError
from raymerge.family import FamilyMethod
from raymerge.schedule import Schedule, check_t
from raymerge.tokens import input_letter

# The one map of dtype names: what users and config.json say -> what safetensors headers say.
DTYPE_CHOICES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}  # mergekit's
PAD_STRATEGIES = ("gradient", "zeros", "copy", "mean")
VOCAB_MODES = ("auto", "union", "a", "b")
DEVICE_CHOICES = ("auto", "cpu", "gpu")
# The sizes' defaults as users write them: the command line shows these, MergeOptions holds them
# parsed. Every other default is MergeOptions' own.
DEFAULT_SIZES = {"max_shard_size": "5GB", "block_bytes": "1MiB", "eval_bytes": "1MB"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Parse ``5GB``, ``500MB``, ``2GiB`` or a plain byte count (as transformers does).

    Example:
        >>> parse_size("5GB"), parse_size("2KiB"), parse_size(100)
        (5000000000, 2048, 100)
    """
    if isinstance(text, int):
        value = text
    else:
        s = text.strip().upper()
        num = s.rstrip("KMGTIB")
        unit = s[len(num):]
        if unit not in _UNITS or not num:
            raise InputError(f"cannot read size {text!r}: use bytes or a unit such as 500MB, 5GB, 2GiB")
        try:
            value = int(float(num) * _UNITS[unit])
        except ValueError:
            raise InputError(f"cannot read size {text!r}") from None
    if value <= 0:
        raise InputError(f"size must be positive, got {text!r}")
    return value


def config_dtype(safetensors_name: str) -> str | None:
    """``BF16`` -> ``bfloat16``: the name config.json's ``dtype`` uses."""
    return {v: k for k, v in DTYPE_CHOICES.items()}.get(safetensors_name)


def t_dirname(t: float) -> str:
    """The sub-directory of one sweep output: ``t-0.5`` (Python's ``format(t, "g")``)."""
    return f"t-{format(t, 'g')}"


def weights_label(weights: tuple[Schedule, ...]) -> str:
    """One output's weights as a label: ``1,2,1``, a gradient or filters in brackets.

    Example:
        >>> weights_label((Schedule((1.0,), kind="weight"), Schedule((0.0, 1.0), kind="weight")))
        '1,[default=[0, 1]]'
    """
    return ",".join(format(w.default[0], "g") if not w.filters and len(w.default) == 1 else f"[{w.describe()}]"
                    for w in weights)


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how the actors run: what placement and the actor pools need."""

    workers: int | None
    address: str | None
    gpus_per_actor: float
    device: str
    block_bytes: int
    schedule_timeout_s: float
    progress: bool
    object_storage: bool = False  # a parent or the output is a URI: actors get its configuration


@dataclass(frozen=True)
class ScoringOptions:
    """What ``--eval`` needs: the text, how much of it, the window, and the children it keeps."""

    text: str
    column: str
    max_bytes: int
    context: int | None
    keep: str  # "all", "best" or a number N (the N best)


@dataclass(frozen=True)
class MergeOptions:
    """Everything that decides a merge. Frozen: the driver and actors get it read-only.

    Attributes:
        a, b: parents (directories, hub ids or bucket URIs); ``a`` is the base, reproduced at t=0.
        out: the output directory.
        t: one or more interpolation factors in [0, 1]; several make a sweep into ``out/t-<t>``.
        schedule: per-tensor t (filters and gradients across layers); excludes a sweep.
        dtype: output dtype name (``bfloat16``...), or None for parent A's dtype.
        max_shard_size: bytes per output shard at most (a single tensor may exceed it).
        workers: number of actors, or None for one per CPU (one per GPU on a GPU cluster).
        address: Ray address to attach to, or None to start an embedded local Ray.
        pad: how the shorter vocabulary is extended (see align.py); with rows aligned by token
            string, how a row a parent lacks is filled. None: ``gradient``, or ``copy`` by string.
        vocab: ``auto``, ``union``, ``a`` or ``b``: how the vocabularies are aligned (tokens.py).
        tokenizer_from: "a", "b" or None (the parent whose vocabulary has the merged size).
        resume / overwrite: what to do with a non-empty ``out``.
        block_bytes: float32 bytes of one row block an actor computes on.
        device: ``auto`` (GPU actors where the cluster has GPUs, else CPU actors), ``cpu`` or
            ``gpu``; a GPU actor whose torch cannot use CUDA stops the merge (never a silent
            fallback to the CPU). The device never changes a byte of the output.
        report: where to write the per-tensor report (Parquet), or None.
        schedule_timeout_s: how long actors may wait for resources (e.g. an autoscaler) before
            the merge gives up.
        family: the SLERP family's method (multislerp, nuslerp, karcher) and its parameters, or
            None for two-parent SLERP (``t``, ``schedule``).
        more: the SLERP family's third and later parents (``a`` and ``b`` are the first two).
        base: the family's ``base_model`` (multislerp, nuslerp): the parents are merged as task
            vectors against it.
        weights: the family's weights: one tuple per output (several make a sweep into
            ``out/w-<weights>``), each with one schedule (``kind="weight"``) per parent; empty:
            every parent weighs 1.
        eval_text: a text (.txt, .jsonl, .parquet) to score every t and both parents on (scoring.py).
        eval_column: the text field of a .jsonl, or column of a .parquet.
        eval_bytes: the bytes of the text scored (its first ones).
        context: tokens per window (None: the model's context, at most 2048).
        keep: which children are written: "all", "best" or a number N (the N best); needs
            ``eval_text``, which defaults it to "best".
    """

    a: str
    b: str
    out: str
    t: tuple[float, ...] = (0.5,)
    schedule: Schedule | None = None
    dtype: str | None = None
    max_shard_size: int = parse_size(DEFAULT_SIZES["max_shard_size"])
    workers: int | None = None
    address: str | None = None
    gpus_per_actor: float = 1.0
    device: str = "auto"
    pad: str | None = None
    vocab: str = "auto"
    tokenizer_from: str | None = None
    resume: bool = False
    overwrite: bool = False
    block_bytes: int = parse_size(DEFAULT_SIZES["block_bytes"])
    schedule_timeout_s: float = 300.0
    progress: bool = True
    report: str | None = None
    eval_text: str | None = None
    eval_column: str = "text"
    eval_bytes: int = parse_size(DEFAULT_SIZES["eval_bytes"])
    context: int | None = None
    keep: str | None = None
    family: FamilyMethod | None = None
    more: tuple[str, ...] = ()
    base: str | None = None
    weights: tuple[tuple[Schedule, ...], ...] = ()
    command: str = field(default="", compare=False)

    def __post_init__(self):
        if self.schedule is not None:
            if len(self.t) > 1:
                raise InputError("a sweep (several t) and a per-layer schedule cannot be combined")
        elif not self.t:
            raise InputError("give at least one t")
        for t in self.t:
            check_t(t)
        if len({format(t, "g") for t in self.t}) != len(self.t):
            raise InputError(f"the same t is given twice (outputs are named t-<format(t, 'g')>): {list(self.t)}")
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise InputError(f"unknown dtype {self.dtype!r}: choose from {', '.join(DTYPE_CHOICES)}")
        if self.pad is not None and self.pad not in PAD_STRATEGIES:
            raise InputError(f"unknown pad strategy {self.pad!r}: choose from {', '.join(PAD_STRATEGIES)}")
        family_letters = [input_letter(i) for i in range(len(self.inputs))] if self.family else []
        if self.vocab not in VOCAB_MODES and self.vocab not in family_letters:
            raise InputError(f"unknown vocabulary alignment {self.vocab!r}: choose from {', '.join(VOCAB_MODES)}")
        if self.tokenizer_from not in (None, "a", "b"):
            raise InputError("--tokenizer-from must be 'a' or 'b'")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers must be at least 1, got {self.workers}")
        if self.keep is not None:
            if self.eval_text is None:
                raise InputError("--keep chooses children by their scores: it needs --eval TEXT")
            if self.keep not in ("all", "best") and not (self.keep.isdigit() and int(self.keep) >= 1):
                raise InputError(f"--keep {self.keep!r}: use best, all or a number of children")
            if self.keep.isdigit() and int(self.keep) > len(self.t):
                raise InputError(f"--keep {self.keep}: the sweep has only {len(self.t)} value(s) of t")
        if self.eval_bytes < 1:
            raise InputError(f"--eval-bytes must be positive, got {self.eval_bytes}")
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite exclude each other")
        if self.family is None:
            if self.more or self.base or self.weights:
                raise InputError("more than two parents, a base model and weights need a SLERP-family method: "
                                 "--method multislerp, nuslerp or karcher")
        else:
            self._check_family()

    def _check_family(self) -> None:
        f, n = self.family, 2 + len(self.more)
        name = f.name
        if self.schedule is not None or self.t != (0.5,):
            raise InputError(f"-t, --t-range and --t-for are SLERP's; {name} takes "
                             + ("--weights (one per parent)" if f.weighted else "no t"))
        for flag, given in (("--eval", self.eval_text), ("--report", self.report), ("--keep", self.keep),
                            ("--tokenizer-from", self.tokenizer_from)):
            if given is not None:
                raise InputError(f"{flag} is not supported with {name} (two-parent SLERP only); "
                                 + ("use --vocab" if flag == "--tokenizer-from" else "merge, then score the child"))
        if f.base != (self.base is not None):
            raise InputError(f"{name}: the method's base flag and the base model disagree")
        if self.base is not None and self.base in self.parents:
            raise InputError(f"{name}: the base model {self.base} is also one of the parents")
        if name == "nuslerp" and n != 2:
            raise InputError(f"nuslerp merges exactly two parents (plus an optional base model); got {n}")
        if not f.weighted and self.weights:
            raise InputError(f"{name} takes no weights (every parent counts equally)")
        for ws in self.weights:
            if len(ws) != n:
                raise InputError(f"{name}: {len(ws)} weights for {n} parents")
        labels = [weights_label(ws) for ws in self.weights]
        if len(set(labels)) != len(labels):
            raise InputError(f"the same weights are given twice: {labels}")

    @property
    def parents(self) -> tuple[str, ...]:
        """The parents, in order (two for SLERP)."""
        return (self.a, self.b, *self.more)

    @property
    def inputs(self) -> tuple[str, ...]:
        """What a merge reads, in the plan's input order: the parents, then the base (if any)."""
        return self.parents + ((self.base,) if self.base is not None else ())

    def weights_for(self, name: str, n_layers: int) -> tuple[tuple[float, ...], ...]:
        """The SLERP family's weights for one tensor: per output, one per parent."""
        return tuple(tuple(w.t_for(name, n_layers) for w in ws) for ws in self._outputs_weights())

    def _outputs_weights(self) -> tuple[tuple[Schedule, ...], ...]:
        return self.weights or ((Schedule((1.0,), kind="weight"),) * len(self.parents),)

    @property
    def sweep(self) -> bool:
        if self.family is not None:
            return len(self.weights) > 1
        return self.schedule is None and len(self.t) > 1

    def t_for(self, name: str, n_layers: int) -> tuple:
        """What one tensor is merged at, one per output: a t for SLERP, the parents' weights for
        the SLERP family."""
        if self.family is not None:
            return self.weights_for(name, n_layers)
        if self.schedule is not None:
            return (self.schedule.t_for(name, n_layers),)
        return self.t

    def t_labels(self) -> list[str]:
        """One label per output: ``0.5``, the schedule's description, or the family's method
        and weights."""
        if self.family is not None:
            if not self.family.weighted:
                return [self.family.describe()]
            return [f"{self.family.describe()} weights {weights_label(ws)}" for ws in self._outputs_weights()]
        if self.schedule is not None:
            return [self.schedule.describe()]
        return [format(t, "g") for t in self.t]

    @property
    def cluster(self) -> ClusterOptions:
        """What placement and the actor pools need."""
        return ClusterOptions(self.workers, self.address, self.gpus_per_actor, self.device, self.block_bytes,
                              self.schedule_timeout_s, self.progress,
                              any(storage.is_uri(p) for p in (*self.inputs, self.out)))

    @property
    def scoring(self) -> ScoringOptions | None:
        """What ``--eval`` needs, or None without ``--eval``."""
        if self.eval_text is None:
            return None
        return ScoringOptions(self.eval_text, self.eval_column, self.eval_bytes, self.context, self.keep or "best")

    def output_dirs(self) -> list[str]:
        """Sub-directories of ``out`` holding the models, one per t ("" for a single t, or a
        schedule); with ``--eval``, every t has its ``t-<t>`` even alone."""
        if self.family is not None:
            if not self.sweep:
                return [""]
            labels = [weights_label(ws) for ws in self.weights]
            # Gradients and filters make no tidy name: those sweeps' outputs are numbered.
            return [f"w-{label}" if "[" not in label else f"w-{i}" for i, label in enumerate(labels)]
        if self.schedule is None and (self.sweep or self.eval_text is not None):
            return [t_dirname(t) for t in self.t]
        return [""]
