"""Small (or benchmark-sized) Llama parents with random weights and a real tokenizer.

Used by ``make demo``, the tests and the benchmarks; nothing is downloaded. Tensor names and
shapes come from transformers' own ``LlamaForCausalLM`` built on the meta device, so the files
are laid out as a real checkpoint; the values are seeded random numbers written tensor by tensor,
so even a 0.85B-parameter parent is built without holding the model in memory. Parent B is made
as a "fine-tune" of A: A's values plus noise, with any extra vocabulary rows drawn fresh.
"""

from __future__ import annotations

import json
import os
import zlib

import torch

from raymerge.plan import chunk_by_size, shard_filenames
from raymerge.shards import DTYPE_NAMES, ShardFile, layout_shard

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def llama_config(vocab_size: int = 1000, hidden_size: int = 64, intermediate_size: int = 128,
                 num_hidden_layers: int = 4, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                 tie_word_embeddings: bool = False, dtype: str = "bfloat16"):
    from transformers import LlamaConfig

    # architectures is what transformers' save_pretrained of a model records; mergekit and vLLM
    # read it to pick the model class.
    return LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2, dtype=dtype,
    )


def build_tokenizer(path: str, base_vocab: int, vocab_size: int | None = None, words_seed: int = 0) -> None:
    """A word-level tokenizer of ``base_vocab`` tokens, plus added tokens up to ``vocab_size``.

    Parents that extend a vocabulary share the first ``base_vocab`` tokens, as fine-tunes do.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + [f"w{i}" for i in range(base_vocab - len(SPECIAL_TOKENS))]
    if words_seed:
        words = SPECIAL_TOKENS + [f"v{words_seed}_{i}" for i in range(base_vocab - len(SPECIAL_TOKENS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    extra = (vocab_size or base_vocab) - base_vocab
    if extra > 0:
        fast.add_tokens([f"<extra_{i}>" for i in range(extra)])
    fast.save_pretrained(path)


def _shapes(config) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # state_dict() lists tied weights under both names; the saved checkpoint holds only one.
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return dict(sorted(names.items()))


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _values(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=_generator(seed, name))
    return 0.02 * torch.randn(shape, generator=_generator(seed, name))


def _tensor(name: str, shape: tuple[int, ...], seed: int, base_seed: int | None,
            base_shape: tuple[int, ...] | None, noise: float) -> torch.Tensor:
    if base_seed is None:
        return _values(name, shape, seed)
    # A fine-tune of the base: the base's rows plus noise; rows the base lacks are new.
    base_rows = (base_shape or shape)[0] if shape else None
    if shape and base_rows < shape[0]:
        head = _values(name, (base_rows, *shape[1:]), base_seed)
        tail = _values(name + "#new", (shape[0] - base_rows, *shape[1:]), seed)
        x = torch.cat([head, tail])
    else:
        x = _values(name, shape, base_seed)
    return x + noise * _values(name + "#noise", shape, seed).sub_(1.0 if name.endswith("norm.weight") else 0.0)


def build_parent(path: str, config, seed: int = 0, base: tuple | None = None, noise: float = 0.5,
                 max_shard_bytes: int = 2 * 10**9, tokenizer: bool = True, base_vocab: int | None = None,
                 words_seed: int = 0) -> str:
    """Write a random-weight Llama checkpoint (config, safetensors shards, tokenizer) to ``path``.

    Args:
        config: a ``LlamaConfig`` (see ``llama_config``).
        seed: seed of this parent's values.
        base: ``(base_config, base_seed)`` to make this parent a noisy fine-tune of that one.
        noise: size of the fine-tune's change relative to the weights.
        base_vocab: tokens shared with other parents (the rest are added tokens).
    """
    os.makedirs(path, exist_ok=True)
    shapes = _shapes(config)
    base_shapes = _shapes(base[0]) if base is not None else {}
    dtype = getattr(torch, str(config.dtype).replace("torch.", ""))
    groups = chunk_by_size(list(shapes), max_shard_bytes, lambda n: dtype.itemsize * int(torch.Size(shapes[n]).numel()))
    files = shard_filenames(len(groups))
    weight_map = {}
    for file, names in zip(files, groups):
        layout = layout_shard([(n, DTYPE_NAMES[dtype], shapes[n]) for n in names])
        shard = ShardFile(os.path.join(path, file), layout.header, layout.size)
        for n in sorted(names, key=lambda n: layout.offsets[n]):  # file order: the shard is written front to back
            x = _tensor(n, shapes[n], seed, None if base is None else base[1], base_shapes.get(n), noise)
            shard.write_tensor(layout.offsets[n][0], x.to(dtype))
            weight_map[n] = file
        shard.close(sync=False)
    if len(files) > 1:
        total = sum(dtype.itemsize * int(torch.Size(s).numel()) for s in shapes.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=16).save_pretrained(path)
    if tokenizer:
        build_tokenizer(path, base_vocab or config.vocab_size, config.vocab_size, words_seed)
    config.save_pretrained(path)  # last: a directory with config.json is complete
    return path
