"""mergekit recipes (YAML) read into raymerge's terms: parents, schedule or weights, dtype.

Accepted for ``merge_method: slerp``: two models, given as ``models:`` or as one slice of
``slices:`` whose two sources cover the full, equal layer range; ``base_model`` (parent A);
``parameters.t`` as a number, a list (a gradient across layers) or filtered entries
(``- filter: self_attn`` / ``value: ...``, a last entry without filter as the default); ``dtype``;
``tokenizer_source`` (or ``tokenizer.source``): ``union``, ``base`` or one of the models, which
become ``--vocab union``, ``a`` or ``b`` (rows aligned by token string).

Accepted for ``merge_method: multislerp | nuslerp | karcher`` (the SLERP family, family.py):
``models:`` with per-model ``parameters.weight`` (a number, a gradient or filtered entries, as t
above; a model equal to ``base_model`` is the base, not a parent, as in mergekit); the method's
parameters under ``parameters`` (``normalize_weights``, ``eps``; ``nuslerp_flatten``,
``nuslerp_row_wise``; ``max_iter``, ``tol``), where a ``weight`` is every model's default;
``base_model`` (multislerp, nuslerp); ``dtype`` and ``out_dtype`` (raymerge computes in float64:
the output dtype is ``out_dtype``, else ``dtype``); ``tokenizer_source``.

Anything else is refused with what it was, rather than silently merged differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import yaml

from raymerge.errors import InputError
from raymerge.family import METHODS, PARAMETERS, FamilyMethod
from raymerge.options import DTYPE_ALIASES, DTYPE_CHOICES
from raymerge.schedule import Schedule
from raymerge.tokens import input_letter

KNOWN_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "tokenizer_source", "tokenizer",
              "out_dtype"}
# The method parameters' types (mergekit's names; defaults in family.FamilyMethod).
PARAMETER_TYPES = {"normalize_weights": bool, "eps": float, "nuslerp_flatten": bool, "nuslerp_row_wise": bool,
                   "max_iter": int, "tol": float}
DTYPES = {**{name: name for name in DTYPE_CHOICES}, **DTYPE_ALIASES}


@dataclass(frozen=True)
class Recipe:
    parents: tuple[str, ...]  # slerp: (base_model, the other): t=0, t=1
    schedule: Schedule | None  # slerp's t
    dtype: str | None
    layer_range: tuple[int, int] | None  # from the slices form, checked against the parents
    vocab: str = "auto"  # from tokenizer_source: union, or an input's letter (a, b, ...)
    family: FamilyMethod | None = None
    base: str | None = None  # the SLERP family's base_model
    weights: tuple[Schedule, ...] = ()  # the SLERP family's: one per parent
    notes: tuple[str, ...] = ()

    @property
    def a(self) -> str:
        return self.parents[0]

    @property
    def b(self) -> str:
        return self.parents[1]

    def merge_values(self) -> dict:
        """The recipe as ``cli.build_options`` arguments."""
        values = {"parents": self.parents, "dtype": self.dtype}
        if self.family is None:
            return {**values, "schedule": self.schedule}
        return {**values, "method": self.family.name, "family": self.family, "base": self.base,
                "weights": (self.weights,) if self.weights else ()}


def _values(value, where: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
        raise InputError(f"recipe: {where} must be a finite number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise InputError(f"recipe: {where} must be a number or a list of numbers, got {value!r}")
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise InputError(f"recipe: {where} must be a number or a list of numbers, got {value!r}")
    return tuple(float(v) for v in values)


def parse_t(setting, kind: str = "t") -> Schedule:
    """``parameters.t`` (or a model's ``weight``) in any of mergekit's forms -> a Schedule."""
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        filters, default = [], ()
        for entry in setting:
            if set(entry) - {"filter", "value"} or "value" not in entry:
                raise InputError(f"recipe: {kind} entry {entry!r} needs 'value' and at most 'filter'")
            needle = entry.get("filter")
            if needle in (None, "*"):
                default = _values(entry["value"], kind)
                break  # mergekit stops at the first entry that matches everything
            filters.append((str(needle), _values(entry["value"], f"{kind} for filter {needle!r}")))
        return Schedule(default=default, filters=tuple(filters), kind=kind)
    return Schedule(default=_values(setting, kind), kind=kind)


def _model(entry, where: str, allowed: tuple[str, ...] | None = None) -> str:
    """A recipe's model entry's path; ``allowed``: the per-model parameters it may have (None:
    slerp's, which takes none)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
        raise InputError(f"recipe: {where} needs 'model: PATH'")
    params = entry.get("parameters") or {}
    extra = sorted(set(params) - set(allowed or ())) if isinstance(params, dict) else [repr(params)]
    if extra and allowed is None:
        raise InputError(f"recipe: per-model parameters ({where}) are not supported; use parameters.t")
    if extra:
        raise InputError(f"recipe: per-model parameters {', '.join(extra)} ({where}) are not supported; "
                         + (f"a model takes {', '.join(allowed)}" if allowed else "this method takes none"))
    return entry["model"]


def load_recipe(path: str) -> Recipe:
    """Read a mergekit slerp YAML recipe, refusing what raymerge cannot honour exactly."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise InputError(f"recipe {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise InputError(f"recipe {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise InputError(f"recipe {path}: expected a mapping at the top level")
    unknown = sorted(set(doc) - KNOWN_KEYS)
    if unknown:
        raise InputError(f"recipe {path}: unsupported keys {', '.join(unknown)}")
    method = doc.get("merge_method")
    if method in METHODS:
        return _family_recipe(doc, method, path)
    if method != "slerp":
        raise InputError(f"recipe {path}: merge_method {method!r} is not supported "
                         f"(raymerge does slerp, {', '.join(METHODS)})")
    if "out_dtype" in doc:
        raise InputError(f"recipe {path}: out_dtype is not supported for slerp; dtype is the output's")
    base = doc.get("base_model")
    if not isinstance(base, str):
        raise InputError(f"recipe {path}: slerp needs base_model (the model at t=0)")

    layer_range = None
    if ("models" in doc) == ("slices" in doc):
        raise InputError(f"recipe {path}: give exactly one of 'models' and 'slices'")
    if "models" in doc:
        if not isinstance(doc["models"], list):
            raise InputError(f"recipe {path}: 'models' must be a list")
        models = [_model(m, "models") for m in doc["models"]]
    else:
        slices = doc["slices"]
        if not isinstance(slices, list) or len(slices) != 1:
            raise InputError(f"recipe {path}: only one slice covering every layer is supported "
                             f"(got {len(slices) if isinstance(slices, list) else slices!r})")
        sources = slices[0].get("sources") if isinstance(slices[0], dict) else None
        if not isinstance(sources, list):
            raise InputError(f"recipe {path}: the slice needs 'sources'")
        if set(slices[0]) - {"sources"}:
            raise InputError(f"recipe {path}: slice-level keys {sorted(set(slices[0]) - {'sources'})} are not supported")
        models = [_model(s, "slice sources") for s in sources]
        ranges = {tuple(s.get("layer_range") or ()) for s in sources}
        if len(ranges) != 1 or len(next(iter(ranges))) != 2:
            raise InputError(f"recipe {path}: the sources' layer ranges must be equal, got "
                             f"{[s.get('layer_range') for s in sources]}")
        layer_range = next(iter(ranges))
    distinct = list(dict.fromkeys(models + [base]))
    if len(distinct) != 2:
        raise InputError(f"recipe {path}: slerp merges exactly two models, got {len(distinct)}: {distinct}")
    other = distinct[1] if distinct[0] == base else distinct[0]

    params = doc.get("parameters") or {}
    if not isinstance(params, dict) or set(params) - {"t"}:
        raise InputError(f"recipe {path}: only parameters.t is supported, got {params!r}")
    if "t" not in params:
        raise InputError(f"recipe {path}: slerp needs parameters.t")
    dtype = doc.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"recipe {path}: dtype {dtype!r} is not supported ({', '.join(DTYPES)})")
    return Recipe((base, other), parse_t(params["t"]), DTYPES.get(dtype), layer_range,
                  _vocab(doc, [base, other], None, path))


def _family_recipe(doc: dict, method: str, path: str) -> Recipe:
    """A multislerp, nuslerp or karcher recipe (see the module docstring)."""
    if "slices" in doc or not isinstance(doc.get("models"), list):
        raise InputError(f"recipe {path}: {method} takes its parents as 'models' (slices are supported for slerp only)")
    base = doc.get("base_model")
    if base is not None and not isinstance(base, str):
        raise InputError(f"recipe {path}: base_model must be a path")
    family = FamilyMethod(method)
    allowed = ("weight",) if family.weighted else ()
    entries = [(entry, _model(entry, "models", allowed)) for entry in doc["models"]]
    base_listed = any(m == base for _, m in entries)
    # As in mergekit, a listed model equal to base_model is the base, not one more parent.
    entries = [(entry, m) for entry, m in entries if m != base]
    notes = []
    if base is not None and method == "karcher":
        notes.append("karcher uses no base_model (mergekit's documentation says so; its code averages the base "
                     f"in as one more model): {base} is not read")
        base = None
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError(f"recipe {path}: parameters must be a mapping, got {params!r}")
    settings = {}
    for key, value in params.items():
        if key == "weight" and family.weighted:
            continue
        if key not in PARAMETERS[method]:
            raise InputError(f"recipe {path}: {method} takes no parameter {key!r}"
                             f" (it takes {', '.join(PARAMETERS[method] + (('weight',) if family.weighted else ()))})")
        kind = PARAMETER_TYPES[key]
        if kind is bool and not isinstance(value, bool) or kind is not bool and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or kind is int and not isinstance(value, int)):
            raise InputError(f"recipe {path}: {key} must be a single {kind.__name__}, got {value!r} "
                             "(gradients and filters apply to weights only)")
        settings[key] = kind(value)
    family = FamilyMethod(method, base=base is not None, **settings)
    weights = ()
    if family.weighted:
        default = params.get("weight")
        missing = [m for entry, m in entries if "weight" not in (entry.get("parameters") or {}) and default is None]
        if missing:
            raise InputError(f"recipe {path}: {method} needs a weight for every model (mergekit has no default); "
                             f"none for {', '.join(missing)}")
        weights = tuple(parse_t((entry.get("parameters") or {}).get("weight", default), "weight")
                        for entry, _ in entries)
    parents = tuple(m for _, m in entries)
    if len(parents) < 2:
        raise InputError(f"recipe {path}: {method} merges at least two models besides the base_model; got "
                         f"{len(parents)}" + (f" ({base} is the base)" if base_listed else ""))
    if len(set(parents)) != len(parents):
        raise InputError(f"recipe {path}: a model is listed twice: {list(parents)}")
    dtype = doc.get("out_dtype") or doc.get("dtype")
    for key in ("dtype", "out_dtype"):
        if doc.get(key) is not None and doc[key] not in DTYPES:
            raise InputError(f"recipe {path}: {key} {doc[key]!r} is not supported ({', '.join(DTYPES)})")
    return Recipe(parents, None, DTYPES.get(dtype), None, _vocab(doc, list(parents), base, path), family, base,
                  weights, tuple(notes))


def _vocab(doc: dict, parents: list[str], base: str | None, path: str) -> str:
    """mergekit's ``tokenizer_source`` (or ``tokenizer: {source: ...}``) as a ``--vocab`` mode."""
    if "tokenizer_source" in doc and "tokenizer" in doc:
        raise InputError(f"recipe {path}: give tokenizer_source or tokenizer, not both")
    source = doc.get("tokenizer_source")
    if "tokenizer" in doc:
        section = doc["tokenizer"]
        if not isinstance(section, dict) or set(section) - {"source"}:
            raise InputError(f"recipe {path}: only tokenizer.source is supported, got {section!r}")
        source = section.get("source")
    if source is None:
        return "auto"
    if source == "union":
        return "union"
    inputs = parents + ([base] if base else [])
    if source == "base":
        if base is None and len(parents) > 2:
            raise InputError(f"recipe {path}: tokenizer_source 'base', but the recipe has no base_model")
        source = base or parents[0]
    if source in inputs:
        return input_letter(inputs.index(source))
    raise InputError(f"recipe {path}: tokenizer_source {source!r} is not union, base or one of the models")


def check_layer_range(recipe: Recipe, n_layers_a: int, n_layers_b: int) -> None:
    """A slice must cover every layer of both parents: partial ranges change the architecture."""
    if recipe.layer_range is None:
        return
    lo, hi = recipe.layer_range
    if (lo, hi) != (0, n_layers_a) or n_layers_a != n_layers_b:
        raise InputError(f"recipe: layer_range [{lo}, {hi}] does not cover every layer "
                         f"(the parents have {n_layers_a} and {n_layers_b}); partial ranges are not supported")


def write_recipe(a: str, b: str, schedule: Schedule, dtype: str | None = None) -> str:
    """The mergekit slerp recipe (YAML, the ``models:`` form) of a merge of ``a`` (the base, t=0)
    and ``b`` under ``schedule``: what `raymerge run` and mergekit-yaml both read back as that
    merge. A gradient of one value is written as that number; floats keep every digit.

    Example:
        >>> print(write_recipe("a", "b", Schedule(default=(0.5,), filters=(("mlp", (0.0, 1.0)),))), end="")
        models:
        - model: a
        - model: b
        merge_method: slerp
        base_model: a
        parameters:
          t:
          - filter: mlp
            value:
            - 0.0
            - 1.0
          - value: 0.5
    """
    def value(values: tuple[float, ...]):
        return values[0] if len(values) == 1 else list(values)

    if not schedule.default:
        raise ValueError("a recipe's schedule needs a default")
    t = [{"filter": f, "value": value(v)} for f, v in schedule.filters] + [{"value": value(schedule.default)}]
    doc = {"models": [{"model": a}, {"model": b}], "merge_method": "slerp", "base_model": a,
           "parameters": {"t": t if schedule.filters else value(schedule.default)}}
    if dtype:
        doc["dtype"] = dtype
    return yaml.safe_dump(doc, sort_keys=False)
