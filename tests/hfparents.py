"""Parents exactly as transformers' ``save_pretrained`` writes them, for any architecture.

Each architecture gets a tiny config through its own transformers config class; parent A has
random weights, parent B is A plus noise (a "fine-tune"), both saved in bfloat16.
"""

from __future__ import annotations

import json
import os

import torch

IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
VOCAB = 96


def tiny_config(arch: str, **overrides):
    """A tiny config of ``arch`` through transformers' own class for it."""
    import transformers as tf

    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **IDS)
    llama_like = dict(small, intermediate_size=64, num_key_value_heads=2)
    configs = {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "mistral": lambda: tf.MistralConfig(**llama_like, sliding_window=16),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "gemma": lambda: tf.GemmaConfig(**dict(llama_like, num_key_value_heads=1), head_dim=8),
        "phi3": lambda: tf.Phi3Config(**dict(llama_like, num_key_value_heads=4)),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **IDS),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**small, intermediate_size=64),
        "opt": lambda: tf.OPTConfig(**small, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64),
        "falcon": lambda: tf.FalconConfig(**small),
        "mixtral": lambda: tf.MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2),
    }
    config = configs[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_parent(path: str, config, seed: int, noise_seed: int | None = None, noise: float = 0.5) -> str:
    """Build the model transformers makes from ``config`` and ``save_pretrained`` it to ``path``.

    With ``noise_seed``, every weight gets ``noise`` times its own spread of seeded noise.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if noise_seed is not None:
        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in model.parameters():
                spread = p.float().std() if p.numel() > 1 else p.float().abs()
                p.add_(noise * spread.clamp_min(1e-3) * torch.randn(p.shape, generator=g))
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def edit_config(path: str, drop: tuple[str, ...] = (), **values) -> None:
    """Change a saved parent's config.json as a hand-edited (or older) checkpoint would have it."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    for key in drop:
        config.pop(key, None)
    config.update(values)
    with open(file, "w") as f:
        json.dump(config, f, indent=2)
