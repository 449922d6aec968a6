"""``raymerge verify OUT``: check a merged model directory (or URI), one line per problem found.

Checks: every shard's header is valid and its tensors lie within the file; the index and the
shards agree (``weight_map``, ``metadata.total_size``); every float tensor is finite (read in
row blocks); ``vocab_size`` equals the embedding rows; the tokenizer fits the vocabulary; the
provenance file is present. ``--load`` also loads the model with transformers and runs a
forward pass.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile

import torch
from safetensors import safe_open

from raymerge import storage
from raymerge.align import embedding_name
from raymerge.assemble import PROVENANCE_NAME
from raymerge.errors import InputError
from raymerge.parents import SAFETENSORS_INDEX, load_parent
from raymerge.shards import FLOAT_DTYPES, TORCH_DTYPES, numel

BLOCK_ELEMS = 16 * 2**20


def _finite(entry) -> bool:
    if storage.is_uri(entry.file):
        return _finite_object(entry)
    with safe_open(entry.file, framework="pt") as f:
        if not entry.shape:
            return bool(torch.isfinite(f.get_tensor(entry.name)).all())
        sl = f.get_slice(entry.name)
        step = max(1, BLOCK_ELEMS // max(1, numel(entry.shape[1:])))
        for r0 in range(0, entry.shape[0], step):
            if not torch.isfinite(sl[r0:r0 + step]).all():
                return False
    return True


def _finite_object(entry) -> bool:
    """The same check on a tensor in a bucket, read in ranged blocks of rows."""
    dtype = TORCH_DTYPES[entry.dtype]
    block = max(1, BLOCK_ELEMS // max(1, numel(entry.shape[1:]))) * max(1, numel(entry.shape[1:])) * dtype.itemsize
    for start in range(entry.start, entry.end, block):
        raw = bytearray(storage.read_range(entry.file, start, min(block, entry.end - start)))
        if not torch.isfinite(torch.frombuffer(raw, dtype=dtype)).all():
            return False
    return True


def verify(path: str, load: bool = False) -> list[str]:
    """Return the problems found in the model directory ``path`` (empty when it is sound)."""
    try:
        model = load_parent(path, "output")
    except InputError as e:
        return [str(e)]
    problems = []
    index_path = os.path.join(model.path, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        in_files = {n: posixpath.basename(e.file) for n, e in model.tensors.items()}
        if index.get("weight_map") != in_files:
            missing = sorted(set(index.get("weight_map", {})) ^ set(in_files))
            problems.append(f"{index_path}: weight_map disagrees with the shards (e.g. {missing[:3] or 'file names'})")
        total = sum(e.nbytes for e in model.tensors.values())
        if index.get("metadata", {}).get("total_size") != total:
            problems.append(f"{index_path}: metadata.total_size is {index.get('metadata', {}).get('total_size')}, "
                            f"the shards hold {total} bytes")
    for name, entry in sorted(model.tensors.items()):
        if entry.dtype in FLOAT_DTYPES and not _finite(entry):
            problems.append(f"{entry.file}: tensor {name!r} holds NaN or inf")
    embed = embedding_name(model)
    rows = model.tensors[embed].shape[0] if embed else None
    if rows is not None and model.vocab_size != rows:
        problems.append(f"config.json: vocab_size is {model.vocab_size}, the embedding has {rows} rows")
    try:
        vocab = model.vocab
    except InputError as e:
        vocab = None
        problems.append(str(e))
    if vocab is not None and rows is not None and len(vocab.tokens) > rows:
        problems.append(f"tokenizer: {len(vocab.tokens)} tokens do not fit {rows} embedding rows")
    if not os.path.isfile(os.path.join(model.path, PROVENANCE_NAME)):
        problems.append(f"{PROVENANCE_NAME} is missing: not a complete raymerge output")
    if load and not problems:
        if storage.is_uri(path):  # transformers loads from a local directory: copy the model there
            with tempfile.TemporaryDirectory(prefix="raymerge-verify-") as local:
                storage.download_tree(path, local)
                problems += _load_and_run(local)
        else:
            problems += _load_and_run(model.path)
    return problems


def _load_and_run(path: str) -> list[str]:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3]])).logits
    except Exception as e:  # any failure to load or run is the finding itself
        return [f"transformers cannot load or run the model: {type(e).__name__}: {str(e).splitlines()[0]}"]
    return [] if torch.isfinite(logits).all() else ["the forward pass gives non-finite logits"]
