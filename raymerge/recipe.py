"""mergekit slerp recipes (YAML) read into raymerge's terms: parents, schedule and dtype.

Accepted: ``merge_method: slerp``; two models, given as ``models:`` or as one slice of
``slices:`` whose two sources cover the full, equal layer range; ``base_model`` (parent A);
``parameters.t`` as a number, a list (a gradient across layers) or filtered entries
(``- filter: self_attn`` / ``value: ...``, a last entry without filter as the default); ``dtype``;
``tokenizer_source`` (or ``tokenizer.source``): ``union``, ``base`` or one of the models, which
become ``--vocab union``, ``a`` or ``b`` (rows aligned by token string).
Anything else is refused with what it was, rather than silently merged differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from raymerge.errors import InputError
from raymerge.options import DTYPE_ALIASES, DTYPE_CHOICES
from raymerge.schedule import Schedule

KNOWN_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "tokenizer_source", "tokenizer"}
DTYPES = {**{name: name for name in DTYPE_CHOICES}, **DTYPE_ALIASES}


@dataclass(frozen=True)
class Recipe:
    a: str  # base_model, t=0
    b: str
    schedule: Schedule
    dtype: str | None
    layer_range: tuple[int, int] | None  # from the slices form, checked against the parents
    vocab: str = "auto"  # from tokenizer_source: union, base (a) or a model (a or b)


def _values(value, where: str) -> tuple[float, ...]:
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise InputError(f"recipe: {where} must be a number or a list of numbers, got {value!r}")
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise InputError(f"recipe: {where} must be a number or a list of numbers, got {value!r}")
    return tuple(float(v) for v in values)


def parse_t(setting) -> Schedule:
    """``parameters.t`` in any of mergekit's forms -> a Schedule."""
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        filters, default = [], ()
        for entry in setting:
            if set(entry) - {"filter", "value"} or "value" not in entry:
                raise InputError(f"recipe: t entry {entry!r} needs 'value' and at most 'filter'")
            needle = entry.get("filter")
            if needle in (None, "*"):
                default = _values(entry["value"], "t")
                break  # mergekit stops at the first entry that matches everything
            filters.append((str(needle), _values(entry["value"], f"t for filter {needle!r}")))
        return Schedule(default=default, filters=tuple(filters))
    return Schedule(default=_values(setting, "t"))


def _model(entry, where: str) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
        raise InputError(f"recipe: {where} needs 'model: PATH'")
    if entry.get("parameters"):
        raise InputError(f"recipe: per-model parameters ({where}) are not supported; use parameters.t")
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
    if method != "slerp":
        raise InputError(f"recipe {path}: merge_method {method!r} is not supported (raymerge does slerp)")
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
    return Recipe(base, other, parse_t(params["t"]), DTYPES.get(dtype), layer_range,
                  _vocab(doc, base, other, path))


def _vocab(doc: dict, base: str, other: str, path: str) -> str:
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
    if source == "base" or source == base:
        return "a"
    if source == other:
        return "b"
    raise InputError(f"recipe {path}: tokenizer_source {source!r} is not union, base or one of the two models")


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
