"""Two tiny Llamas that mean something: one base, fine-tuned for a few seconds on two texts.

Text A talks about animals and places, text B about numbers and tools; both use one word-level
tokenizer. Parent A and parent B start from the same random base and are each trained on their
own text, so a child between them should model a text that mixes both better than either parent:
the curve of ``raymerge merge A B --t-range 0:1:0.1 --eval mixed.txt`` then has a shape.
Everything is made here, with fixed seeds; nothing is downloaded.
"""

from __future__ import annotations

import os
import random

import torch

ANIMALS = ["cat", "dog", "fox", "owl", "hen", "cow", "bee", "elk"]
PLACES = ["mat", "barn", "hill", "pond", "field", "nest", "road", "tree"]
VERBS_A = ["sat on", "ran to", "slept in", "looked at", "walked past"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
TOOLS = ["hammer", "saw", "drill", "rope", "nail", "wrench", "file", "clamp"]
VERBS_B = ["plus", "times", "holds", "breaks", "needs"]


def sentence(kind: str, r: random.Random) -> str:
    if kind == "a":
        return f"the {r.choice(ANIMALS)} {r.choice(VERBS_A)} the {r.choice(PLACES)} ."
    return f"{r.choice(NUMBERS)} {r.choice(TOOLS)} {r.choice(VERBS_B)} {r.choice(NUMBERS)} {r.choice(TOOLS)} ."


def text(kind: str, n: int, seed: int) -> str:
    """``n`` sentences of kind ``a``, ``b``, or ``mixed`` (alternating)."""
    r = random.Random(seed)
    kinds = ["a", "b"] if kind == "mixed" else [kind]
    return " ".join(sentence(kinds[i % len(kinds)], r) for i in range(n))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for parts in (ANIMALS, PLACES, VERBS_A, NUMBERS, TOOLS, VERBS_B) for p in parts
                    for w in p.split()} | {"the", "."})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _train(model, ids: torch.Tensor, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (16,), generator=g)
        batch = torch.stack([ids[s:s + 33] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build(root: str, steps: int = 120) -> tuple[str, str, str]:
    """Write parent A, parent B and a held-out mixed text under ``root``; return their paths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).state_dict()
    paths = []
    for kind, seed in (("a", 1), ("b", 2)):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base)
        ids = torch.tensor(tok(text(kind, 600, seed)).input_ids)
        _train(model, ids, steps, seed)
        path = os.path.join(root, f"parent-{kind}")
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    mixed = os.path.join(root, "mixed.txt")
    with open(mixed, "w") as f:
        f.write(text("mixed", 200, 99))
    return paths[0], paths[1], mixed
