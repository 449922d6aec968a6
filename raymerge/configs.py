"""Parent configs, read through transformers, and the check that two of them can be merged.

A config is read with ``AutoConfig`` (never remote code), so every attribute a checkpoint omits
takes the default transformers applies when it loads the model: ``tie_word_embeddings`` absent
means untied for Llama, Mistral or Qwen2 and tied for GPT-2 or Gemma. Two configs are then
compared attribute by attribute:

- a difference in what decides the weights' shapes or meaning (``SHAPE_ATTRIBUTES``, the rope
  type and scaling, the tie) is refused: merging such parents tensor by tensor gives a broken
  model, even where the tensors happen to have equal shapes (32 heads of 128 against 16 of 256);
- any other difference is tested the way transformers would see it: the model is built on the
  meta device from A's config and from A's config with B's value; if any tensor's name or shape
  changes, the difference is refused too;
- what is left changes no tensor (``rope_theta``, ``max_position_embeddings``, ``rms_norm_eps``...):
  the child takes A's value, and a note names the attribute and both values.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

from raymerge.errors import InputError

# Attributes that decide the tensors' shapes or how they are read, through transformers' own
# names (a config's attribute_map turns GPT-2's n_layer into num_hidden_layers).
SHAPE_ATTRIBUTES = (
    "model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size",
    "num_local_experts", "num_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "tie_word_embeddings",
)
# Differences that are nobody's business: bookkeeping, and the vocabulary (the aligner's job).
IGNORED = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "vocab_size",
           "_attn_implementation_autoset", "architectures_autoset"}
ROPE_KEYS = ("rope_parameters", "rope_scaling")


@dataclass(frozen=True)
class ParentConfig:
    """A parent's ``config.json`` as written, and as transformers reads it."""

    path: str  # the config.json file
    raw: dict  # the file's own keys: the child's config is written from A's
    hf: object  # a transformers PretrainedConfig, class defaults applied
    known: bool  # False: a model type transformers does not know, read as plain JSON

    @property
    def text(self):
        """The language model's config (a multimodal config nests it as ``text_config``)."""
        get = getattr(self.hf, "get_text_config", None)
        return get() if get else self.hf

    def get(self, name: str, default=None):
        return getattr(self.text, name, getattr(self.hf, name, default))

    @property
    def tie_word_embeddings(self) -> bool | None:
        """What transformers ties: the config's value, else the model class's default.

        None for a model type transformers does not know and whose config does not say.
        """
        if not self.known and "tie_word_embeddings" not in self.raw:
            return None
        return bool(getattr(self.hf, "tie_word_embeddings", True))


def load_config(model_dir: str, label: str) -> ParentConfig:
    """Read ``model_dir/config.json`` through transformers' config class for its model type."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"parent {label}: {model_dir} has no config.json (not a Hugging Face model directory)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"parent {label}: {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"parent {label}: {path} does not hold a JSON object")
    from transformers import AutoConfig, PretrainedConfig

    try:
        return ParentConfig(path, raw, AutoConfig.from_pretrained(model_dir, trust_remote_code=False), True)
    except (ValueError, KeyError) as e:
        # An architecture transformers does not ship (remote code, a newer release): no class
        # defaults to apply, so the file's own keys are all there is.
        if raw.get("model_type") in _known_model_types():
            raise InputError(f"parent {label}: {path}: transformers cannot read it "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return ParentConfig(path, raw, PretrainedConfig(**{k: v for k, v in raw.items() if k != "model_type"}), False)


def _known_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k.endswith("_config"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _rope(cfg: ParentConfig) -> tuple[dict, object]:
    """The rope settings that change the model's meaning, and ``rope_theta`` (which is noted only)."""
    settings = {}
    for key in ROPE_KEYS:
        value = cfg.get(key)
        if isinstance(value, dict):
            settings.update(value)
    theta = settings.pop("rope_theta", cfg.get("rope_theta"))
    return settings, theta


def _meta_shapes(hf) -> dict:
    """Tensor names and shapes of the model transformers builds from ``hf`` (meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def _with_value(cfg: ParentConfig, key: str, value):
    hf = copy.deepcopy(cfg.hf)
    *path, name = key.split(".")
    target = hf
    for part in path:
        target = getattr(target, part)
    setattr(target, name, value)
    return hf


def compare_configs(a: ParentConfig, b: ParentConfig, labels: tuple[str, str] = ("A", "B")) -> list[str]:
    """Refuse configs that would give a broken child; return notes for harmless differences.

    The tie is not compared: one tied parent and one untied one make an untied child (the aligner
    spells the tied head out).

    Raises:
        InputError: naming the first attribute that differs in shape or meaning, with both values.
    """
    la, lb = labels
    def refuse(name, va, vb, why="it decides the weights' shapes or meaning"):
        raise InputError(f"the parents' configs differ in {name} ({la} {va!r}, {lb} {vb!r}): {why}, "
                         "so they cannot be merged")

    for name in SHAPE_ATTRIBUTES:
        if name == "tie_word_embeddings":
            continue
        va, vb = a.get(name), b.get(name)
        if name == "architectures":
            va, vb = va or None, vb or None
            if va is None or vb is None:  # older checkpoints omit it: model_type decides
                continue
        if va != vb:
            refuse(name, va, vb)
    rope_a, theta_a = _rope(a)
    rope_b, theta_b = _rope(b)
    if rope_a != rope_b:
        refuse("rope type and scaling", rope_a, rope_b)

    flat_a, flat_b = _flat(a.hf.to_dict()), _flat(b.hf.to_dict())
    skip = set(SHAPE_ATTRIBUTES) | set(ROPE_KEYS) | IGNORED | {"rope_theta"}
    differing = sorted(k for k in set(flat_a) | set(flat_b)
                       if k.split(".")[-1] not in skip and flat_a.get(k) != flat_b.get(k))
    base_shapes = _try_meta_shapes(a) if differing and a.known else None
    notes = []
    for key in differing:
        va, vb = flat_a.get(key), flat_b.get(key)
        if base_shapes is not None and key in flat_a and key in flat_b:
            try:
                shapes = _meta_shapes(_with_value(a, key, vb))
            except Exception:  # transformers cannot build A's model with B's value
                refuse(key, va, vb, f"transformers cannot build parent {la}'s model with {lb}'s value")
            if shapes != base_shapes:
                refuse(key, va, vb, "it changes the model's tensors")
        notes.append(f"config: {key} differs ({la} {va!r}, {lb} {vb!r}); the child takes {la}'s value")
    if theta_a != theta_b:
        notes.append(f"config: rope_theta differs ({la} {theta_a!r}, {lb} {theta_b!r}); the child takes {la}'s value")
    return notes


def _try_meta_shapes(cfg: ParentConfig) -> dict | None:
    try:
        return _meta_shapes(cfg.hf)
    except Exception:  # not a causal LM transformers can build: the explicit checks above stand
        return None
