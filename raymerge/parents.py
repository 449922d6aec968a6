"""Parents: find a model directory's config, tokenizer and weight files, and read their headers.

A parent is a local directory, a hub id (through the Hugging Face cache) or an object-store URI
(``s3://bucket/model``): for a URI, its small files (config, tokenizer, index) are copied to a
local cache for transformers to read, and its weights stay where they are. Only headers are read
here; tensor data is read later, in the actors, slice by slice.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property

import torch

from raymerge import storage
from raymerge.configs import ParentConfig, load_config
from raymerge.errors import InputError
from raymerge.shards import DTYPE_NAMES, FLOAT_DTYPES, TensorEntry, numel, read_header
from raymerge.tokens import Vocab, has_tokenizer, load_tokenizer, vocab_of

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# What a merge needs from a hub repository: weights, configs, tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.txt", "*.jinja"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class Parent:
    """One parent model: its directory, config and the header entry of every tensor."""

    label: str  # "A" or "B", for messages
    path: str  # a local directory holding its config and tokenizer files
    config: ParentConfig
    tensors: dict[str, TensorEntry]
    weight_files: tuple[str, ...]
    source: str = ""  # what the user named: a directory, a hub id or a URI
    revision: str | None = None  # the hub commit, for a parent from the Hugging Face cache
    location: str = ""  # where its weights are: ``path``, or the URI

    @property
    def where(self) -> str:
        return self.location or self.path

    @property
    def vocab_size(self) -> int | None:
        return self.config.get("vocab_size")

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers") or 0)

    @property
    def dtype(self) -> str:
        """The float dtype holding most of the parent's bytes (the model's dtype)."""
        totals: dict[str, int] = {}
        for e in self.tensors.values():
            if e.dtype in FLOAT_DTYPES:
                totals[e.dtype] = totals.get(e.dtype, 0) + e.nbytes
        return max(sorted(totals), key=lambda d: totals[d]) if totals else "F32"

    def tokenizer_files(self) -> list[str]:
        return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(self.path, f))]

    def same_tokenizer_as(self, other: "Parent") -> bool:
        """Whether both parents ship the same tokenizer files, byte for byte (then their
        vocabularies are equal without loading either)."""
        files = self.tokenizer_files()
        if not files or files != other.tokenizer_files():
            return False
        return all(filecmp.cmp(os.path.join(self.path, f), os.path.join(other.path, f), shallow=False)
                   for f in files)

    @cached_property
    def tokenizer(self):
        """The parent's tokenizer as transformers loads it (None when it ships none); loaded once."""
        return load_tokenizer(self.path) if has_tokenizer(self.path) else None

    @cached_property
    def vocab(self) -> Vocab | None:
        """The tokenizer's tokens by id (None when the parent ships no tokenizer)."""
        return None if self.tokenizer is None else vocab_of(self.tokenizer)


def _inside(root: str, name: str) -> str:
    """Join a file name from an index to the model directory, refusing any escape from it."""
    path = storage.normalize(storage.join(root, name))
    if not storage.within(path, root):
        raise InputError(f"{root}: index names {name!r}, a path outside the model directory")
    return path


def _weight_files(path: str, weights_root: str) -> list[str]:
    """The weight files named by ``path``'s index, or its single file, found under ``weights_root``
    (``path`` itself, or the URI its small files came from)."""
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        files = _indexed_files(path, weights_root, index_name, single_name)
        if files:
            return files
    shards = sorted(n for n in storage.listdir(weights_root) if re.fullmatch(r"model-.*-of-.*\.safetensors", n))
    if shards:
        return [storage.join(weights_root, n) for n in shards]
    raise InputError(f"{weights_root}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
                     f"{BIN_SINGLE} or {BIN_INDEX})")


def _indexed_files(path: str, weights_root: str, index_name: str, single_name: str) -> list[str]:
    index = os.path.join(path, index_name)
    single = storage.join(weights_root, single_name)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{index}: unreadable index ({e})") from None
        files = []
        for name in sorted(set(weight_map.values())):
            full = _inside(weights_root, name)
            if not storage.isfile(full):
                raise InputError(f"{storage.join(weights_root, index_name)}: names shard {name!r}, which does not exist")
            files.append(full)
        return files
    if storage.isfile(single):
        return [single]
    return []


def read_bin_header(path: str) -> dict[str, TensorEntry]:
    """Names, dtypes and shapes of a PyTorch ``.bin`` checkpoint, without reading its data.

    ``weights_only=True`` means the pickle can only rebuild tensors and plain containers: a
    hostile file cannot run code. ``mmap=True`` maps the storages instead of reading them.
    """
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # the unpickler's own refusal, or a damaged zip: the file is bad input
        raise InputError(f"{path}: not a loadable PyTorch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a state dict")
    entries = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in DTYPE_NAMES:
            raise InputError(f"{path}: entry {name!r} is not a tensor raymerge can read")
        shape = tuple(t.shape)
        entries[name] = TensorEntry(path, name, DTYPE_NAMES[t.dtype], shape, 0, numel(shape) * t.element_size())
    return entries


def resolve(spec: str, label: str) -> str:
    """A local directory as is; ``org/name[@revision]`` through the Hugging Face cache.

    Hub downloads honour ``HF_HOME``, ``HF_HUB_OFFLINE`` and the local cache, and fetch only
    weights, configs and tokenizer files.
    """
    if os.path.isdir(spec) or not HUB_ID.match(spec):
        return spec
    from huggingface_hub import snapshot_download

    repo_id, _, revision = spec.partition("@")
    try:
        return snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline and not cached, unknown repo, no network...
        raise InputError(f"parent {label}: {spec} is not a local directory, and the Hugging Face hub "
                         f"could not provide it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def fetch_small_files(uri: str, label: str) -> str:
    """Copy a parent URI's small files (everything but weights) into a local cache directory that
    transformers can read; returns the directory. Weights are never copied."""
    import hashlib

    try:
        names = storage.listdir(uri)
    except OSError as e:
        raise InputError(f"parent {label}: cannot list {uri}: {storage.describe(e)}") from None
    if not names:
        raise InputError(f"parent {label}: {uri} holds nothing (no such bucket or prefix)")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "raymerge", "parents",
                         hashlib.sha256(uri.encode()).hexdigest()[:16])
    os.makedirs(cache, exist_ok=True)
    for name in names:
        if name.endswith((".safetensors", ".bin")) or not storage.isfile(storage.join(uri, name)):
            continue
        data = storage.read_bytes(storage.join(uri, name))
        tmp = os.path.join(cache, f".{name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(cache, name))
    return cache


def load_parent(spec: str, label: str) -> Parent:
    """Resolve a parent (directory, hub id or URI) and read its config and every weight file's header."""
    location = ""
    if storage.is_uri(spec):
        location = storage.normalize(spec)
        path = fetch_small_files(location, label)
    else:
        path = resolve(spec, label)
        if not os.path.isdir(path):
            raise InputError(f"parent {label}: {path} is not a directory")
        path = os.path.realpath(path)
    config = load_config(path, label)
    files = _weight_files(path, location or path)
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        if file.endswith(".bin") and location:
            raise InputError(f"parent {label}: {file}: PyTorch .bin weights are read from local disk only; "
                             "convert them to safetensors, or copy the parent to a local directory")
        header = read_bin_header(file) if file.endswith(".bin") else read_header(file)
        for name, entry in header.items():
            if name in tensors:
                raise InputError(f"parent {label}: tensor {name!r} appears in two files")
            tensors[name] = entry
    if not tensors:
        raise InputError(f"parent {label}: {location or path} holds no tensors")
    snapshot = re.search(r"/snapshots/([0-9a-f]{40})$", path)
    return Parent(label, path, config, tensors, tuple(files), source=spec,
                  revision=snapshot.group(1) if snapshot else None, location=location)
