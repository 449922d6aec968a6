"""The assembler: everything in an output directory besides the shards.

It writes the tokenizer files, ``generation_config.json``, the model card, the provenance file,
the index and, last of all, ``config.json``: a directory without ``config.json`` is not a model
to transformers or vLLM, so an interrupted merge never looks complete. Every file is written
under a temporary name and renamed, and every file and the directory are synced before
``config.json`` is written (and the directory again after it).
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Sequence

from raymerge import __version__, storage
from raymerge.align import tied
from raymerge.options import MergeOptions, config_dtype
from raymerge.parents import Parent
from raymerge.plan import INDEX_NAME, MergePlan
from raymerge.family import PARAMETERS
from raymerge.tokens import input_index, write_union_tokenizer

PROVENANCE_NAME = "raymerge.json"


def fsync_path(path: str) -> None:
    """Make a file's bytes, or a directory's entries (the renames into it), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: str | bytes) -> None:
    storage.write_bytes(path, data.encode() if isinstance(data, str) else data)


def write_json(path: str, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def index_json(plan: MergePlan) -> dict:
    """``model.safetensors.index.json``: ``metadata.total_size`` and the sorted ``weight_map``."""
    weight_map = {t.name: plan.shards[t.shard].filename for t in sorted(plan.tensors, key=lambda t: t.name)}
    return {"metadata": {"total_size": plan.total_size()}, "weight_map": weight_map}


# Config keys that hold token ids: they follow the parent whose ids the child keeps.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def ids_parent(inputs: Sequence[Parent], plan: MergePlan) -> Parent:
    """The input whose token ids the child keeps: the first, but for ``--vocab b`` (or a
    recipe's ``tokenizer_source`` naming another input)."""
    tmap = plan.token_map
    return inputs[input_index(tmap.mode)] if tmap is not None and tmap.mode != "union" else inputs[0]


def child_config(inputs: Sequence[Parent], plan: MergePlan) -> dict:
    """Parent A's config (its file's own keys) with the merged ``vocab_size``, tie flag and dtype."""
    a = inputs[0]
    b = ids_parent(inputs, plan)
    config = json.loads(json.dumps(a.config.raw))
    target = config["text_config"] if "vocab_size" not in config and isinstance(config.get("text_config"), dict) else config
    if plan.vocab_size is not None:
        target["vocab_size"] = plan.vocab_size
    if plan.tied_output != tied(a):
        config["tie_word_embeddings"] = plan.tied_output
    if b is not a:
        for key in TOKEN_ID_KEYS:
            if key in b.config.raw:
                config[key] = b.config.raw[key]
            else:
                config.pop(key, None)
    dtype = config_dtype(plan.out_dtype)
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = dtype
    return config


def _card_name(p: Parent) -> str:
    """A hub id as the user named it (without @revision), else the local path."""
    return p.source.partition("@")[0] if p.revision else p.path


def model_card(inputs: Sequence[Parent], t_label: str, options: MergeOptions) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    a, b = inputs[:2]
    method = options.family.name if options.family else "slerp"
    data = ModelCardData(
        base_model=[_card_name(p) for p in inputs], library_name="transformers", tags=["merge", "raymerge", method],
    )
    if options.family is None:
        command = options.command or f"raymerge merge {a.path} {b.path} -o OUT -t {t_label}"
        what = (f"This model is a SLERP merge of two parents made with raymerge {__version__}.\n\n"
                f"- Parent A (base, t=0): `{a.source or a.path}`\n- Parent B (t=1): `{b.source or b.path}`\n"
                f"- Method: spherical linear interpolation (SLERP), t = {t_label}\n\n")
    else:
        command = options.command or f"raymerge merge {' '.join(p.path for p in inputs)} -o OUT --method {method}"
        what = (f"This model is a {method} merge of {len(options.parents)} parents made with raymerge {__version__}.\n\n"
                + "".join(f"- {'Base model' if p.label == 'base' else 'Parent ' + p.label}: `{p.source or p.path}`\n"
                          for p in inputs)
                + f"- Method: {t_label}\n\n")
    content = (
        f"---\n{data.to_yaml()}\n---\n\n"
        "# Merged model\n\n"
        + what +
        "## Reproduce\n\n"
        f"```\n{command}\n```\n"
    )
    return str(ModelCard(content))


def provenance(inputs: Sequence[Parent], plan: MergePlan, options: MergeOptions, t_label: str,
               fingerprint: str, shards: dict[str, dict] | None = None) -> dict:
    """``raymerge.json``: parents, options, t, version, and each shard's size, CRC-32 and the one
    process that wrote it (``shards``, from the completion records)."""
    def parent_record(p: Parent) -> dict:
        return {"source": p.source, "path": p.where, "revision": p.revision,
                "files": {posixpath.basename(f): storage.size(f) for f in p.weight_files}}

    family = options.family
    return {
        "raymerge_version": __version__,
        "method": family.name if family else "slerp",
        "method_parameters": None if family is None else {
            k: getattr(family, k) for k in ("normalize_weights", "eps", "nuslerp_flatten", "nuslerp_row_wise",
                                            "max_iter", "tol") if k in PARAMETERS[family.name]},
        "weights": None if family is None or not family.weighted else t_label.rpartition(" weights ")[2],
        "t": None if options.schedule or family else float(t_label),
        "schedule": None if options.schedule is None else {
            "default": list(options.schedule.default),
            "filters": [[needle, list(values)] for needle, values in options.schedule.filters],
        },
        "parents": {p.label.lower(): parent_record(p) for p in inputs},
        "options": {"dtype": config_dtype(plan.out_dtype), "pad": plan.pad,
                    "vocab": plan.token_map.mode if plan.token_map else "by id",
                    "max_shard_size": options.max_shard_size, "tokenizer_from": plan.tokenizer_from,
                    "sweep": list(options.t)},
        "notes": list(plan.notes),
        "plan_fingerprint": fingerprint,
        "shards": shards or {},
    }


def assemble(out_dir: str, inputs: Sequence[Parent], plan: MergePlan, options: MergeOptions, t_label: str,
             fingerprint: str, shards: dict[str, dict] | None = None) -> None:
    """Write every non-shard file of one output; ``config.json`` goes last."""
    if plan.token_map is not None and plan.token_map.mode == "union":
        write_union_tokenizer(out_dir, inputs[0].path, plan.token_map)
    else:
        tok_parent = inputs[input_index(plan.tokenizer_from)]
        for name in tok_parent.tokenizer_files():
            with open(os.path.join(tok_parent.path, name), "rb") as f:
                write_atomic(os.path.join(out_dir, name), f.read())
    gen = os.path.join(ids_parent(inputs, plan).path, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen) as f:
            write_atomic(os.path.join(out_dir, "generation_config.json"), f.read())
    write_atomic(os.path.join(out_dir, "README.md"), model_card(inputs, t_label, options))
    write_json(os.path.join(out_dir, PROVENANCE_NAME), provenance(inputs, plan, options, t_label, fingerprint, shards))
    if len(plan.shards) > 1:
        write_json(os.path.join(out_dir, INDEX_NAME), index_json(plan))
    # Everything above reaches the disk before config.json names the directory a model, so a
    # power cut cannot leave a config without its tokenizer; then config.json's own rename.
    for name in sorted(os.listdir(out_dir)):
        if os.path.isfile(os.path.join(out_dir, name)):
            fsync_path(os.path.join(out_dir, name))
    fsync_path(out_dir)
    write_json(os.path.join(out_dir, "config.json"), child_config(inputs, plan))
    fsync_path(out_dir)

