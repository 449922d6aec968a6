"""Vocabularies aligned by token string (--vocab union|a|b): parents whose tokenizers added
different tokens, for byte-level BPE, SentencePiece with tokenizer.json, and tokenizer.model only."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import raymerge
from hfparents import save_parent, tiny_config
from reference import assert_within_one_ulp, load_dir, mergekit_style_slerp

CORPUS = [f"the quick brown fox {i} jumps over the lazy dog, and the cat sat on mat number {i * 7}."
          for i in range(200)]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _byte_level_base(path: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _sentencepiece_model(root) -> str:
    import sentencepiece as spm

    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "sp"), vocab_size=200,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return str(root / "sp.model")


def _sentencepiece_base(model_file: str, path: str, keep_json: bool = True):
    """A Llama-style parent tokenizer: tokenizer.model, and tokenizer.json unless ``keep_json`` is False."""
    from transformers import AutoTokenizer, LlamaConfig

    os.makedirs(path, exist_ok=True)
    shutil.copyfile(model_file, os.path.join(path, "tokenizer.model"))
    LlamaConfig(vocab_size=8).save_pretrained(path)  # names the model type; replaced by the parent's
    tok = AutoTokenizer.from_pretrained(path)
    return tok


def _parent(path: str, tok, added: list[tuple[str, bool]], seed: int, extra_rows: int = 0,
            chat_template: str | None = None, keep_json: bool = True) -> str:
    """A tiny Llama whose tokenizer is ``tok`` plus ``added`` tokens (content, special)."""
    from tokenizers import AddedToken

    for content, special in added:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
    if chat_template:
        tok.chat_template = chat_template
    config = tiny_config("llama", vocab_size=len(tok) + extra_rows)
    save_parent(path, config, seed=seed, noise_seed=None if seed == 1 else seed)
    tok.save_pretrained(path)
    if not keep_json:
        os.remove(os.path.join(path, "tokenizer.json"))
    return path


# A adds two chat tokens; B adds <|im_end|> first (a shared token at another id), then two of its own.
ADDED_A = [("<|im_start|>", True), ("<|im_end|>", True)]
ADDED_B = [("<|im_end|>", True), ("<pad>", True), ("<tool>", False)]


@pytest.fixture(scope="module")
def kinds(session_dir):
    """Pairs of parents per tokenizer kind: (A, B)."""
    root = session_dir / "tokens"
    sp = _sentencepiece_model(root / "sp")
    pairs = {
        "byte-level": (
            _parent(str(root / "bl-a"), _byte_level_base(""), ADDED_A, seed=1, extra_rows=8,
                    chat_template=CHAT_TEMPLATE),
            _parent(str(root / "bl-b"), _byte_level_base(""), ADDED_B, seed=1, extra_rows=0)),
        "sentencepiece": (
            _parent(str(root / "sp-a"), _sentencepiece_base(sp, str(root / "sp-a")), ADDED_A, seed=1,
                    chat_template=CHAT_TEMPLATE),
            _parent(str(root / "sp-b"), _sentencepiece_base(sp, str(root / "sp-b")), ADDED_B, seed=3)),
        "tokenizer.model only": (
            _parent(str(root / "spm-a"), _sentencepiece_base(sp, str(root / "spm-a")), [], seed=1, keep_json=False),
            _parent(str(root / "spm-b"), _sentencepiece_base(sp, str(root / "spm-b")), ADDED_B, seed=3)),
    }
    # The byte-level pair's B is a fine-tune of the same base: give it its own noise.
    pairs["byte-level"] = (pairs["byte-level"][0], _renoise(pairs["byte-level"][1], seed=5))
    return pairs


def _renoise(path: str, seed: int) -> str:
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    g = torch.Generator().manual_seed(seed)
    save_file({n: (t.float() + 0.5 * t.float().std() * torch.randn(t.shape, generator=g)).to(t.dtype)
               for n, t in tensors.items()}, file, metadata={"format": "pt"})
    return path


def _vocab(path: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def _expected_rows(child_tokens: list[str | None], rows: int, parent: dict[str, torch.Tensor],
                   ids: dict[str, int], other: dict[str, torch.Tensor], other_ids: dict[str, int],
                   name: str, fill: str) -> torch.Tensor:
    """One parent's rows laid out on the child's ids, straight from the parents' own tokenizers."""
    mine, theirs = parent[name].float(), other[name].float()
    by_id = {i: t for t, i in ids.items()}
    other_by_id = {i: t for t, i in other_ids.items()}
    out = []
    for i in range(rows):
        token = child_tokens[i] if i < len(child_tokens) else None
        if token is not None and token in ids and ids[token] < mine.shape[0]:
            out.append(mine[ids[token]])
        elif token is None and i not in by_id and i < mine.shape[0]:
            out.append(mine[i])  # a padding row past the tokenizer, kept by position
        elif fill == "copy":
            j = other_ids.get(token) if token is not None else (i if i not in other_by_id else None)
            out.append(theirs[j] if j is not None and j < theirs.shape[0] else torch.zeros_like(mine[0]))
        elif fill == "mean":
            out.append(parent[name].double().mean(0).float())
        else:
            out.append(torch.zeros_like(mine[0]))
    return torch.stack(out)


def _check_child(out: str, a: str, b: str, t: float, mode: str, fill: str = "copy") -> list[str | None]:
    pa, pb, child = load_dir(a), load_dir(b), load_dir(out)
    ids_a, ids_b = _vocab(a), _vocab(b)
    ids_child = _vocab(out) if mode == "union" else (ids_a if mode == "a" else ids_b)
    tokens: list[str | None] = [None] * (max(ids_child.values()) + 1)
    for token, i in ids_child.items():
        tokens[i] = token
    base_rows = pb[EMBED].shape[0] if mode == "b" else pa[EMBED].shape[0]
    rows = max(len(tokens), base_rows)
    for name in (EMBED, HEAD):
        xa = _expected_rows(tokens, rows, pa, ids_a, pb, ids_b, name, fill)
        xb = _expected_rows(tokens, rows, pb, ids_b, pa, ids_a, name, fill)
        assert child[name].shape[0] == rows, f"{name}: {child[name].shape[0]} rows, expected {rows}"
        assert_within_one_ulp(child[name], mergekit_style_slerp(t, xa, xb), name)
    for name in child:
        if name not in (EMBED, HEAD):
            assert_within_one_ulp(child[name], mergekit_style_slerp(t, pa[name], pb[name]), name)
    return tokens


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece", "tokenizer.model only"])
def test_union_rows_match_the_parents_by_token_string(kinds, kind, ray_head, tmp_path):
    a, b = kinds[kind]
    out = str(tmp_path / "child")
    # auto is union where neither tokenizer extends the other; the tokenizer.model-only A is a
    # prefix of B (auto would pad by id), so union is asked for.
    vocab = "union" if kind == "tokenizer.model only" else "auto"
    raymerge.merge(a, b, out, t=0.4, workers=2, vocab=vocab)
    tokens = _check_child(out, a, b, 0.4, "union")
    ids_a = _vocab(a)
    # A's tokens keep A's ids; B's others follow in B's id order.
    assert all(tokens[i] == t for t, i in ids_a.items())
    b_only = [t for t, _ in sorted(_vocab(b).items(), key=lambda x: x[1]) if t not in ids_a]
    assert tokens[len(ids_a):len(ids_a) + len(b_only)] == b_only
    assert "<pad>" in b_only and "<tool>" in b_only

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tok) == len(ids_a) + len(b_only)
    assert model.get_input_embeddings().weight.shape[0] == max(len(tok), load_dir(a)[EMBED].shape[0])
    for token in ["<|im_end|>", "<pad>", "<tool>"] + (["<|im_start|>"] if kind != "tokenizer.model only" else []):
        assert tok(token, add_special_tokens=False).input_ids == [tokens.index(token)], token
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    assert added["<pad>"].special and not added["<tool>"].special, "B's added tokens keep their flags"
    if kind != "tokenizer.model only":
        assert tok.chat_template == CHAT_TEMPLATE, "the chat template is A's"
    assert tok.eos_token == AutoTokenizer.from_pretrained(a).eos_token
    # Generation through a token only B had.
    ids = tok("the fox <tool>", return_tensors="pt", add_special_tokens=False).input_ids
    assert ids[0, -1].item() == tokens.index("<tool>")
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3


def _files(path: str) -> dict[str, bytes]:
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))
            if n not in ("raymerge.json", "README.md")}


def test_union_ids_and_bytes_are_the_same_every_run_and_from_a_recipe(kinds, cli, tmp_path):
    a, b = kinds["byte-level"]
    raymerge.merge(a, b, str(tmp_path / "one"), t=0.5, vocab="union", workers=1)
    raymerge.merge(a, b, str(tmp_path / "two"), t=0.5, vocab="union", workers=2)
    assert _files(str(tmp_path / "one")) == _files(str(tmp_path / "two"))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                      f"parameters:\n  t: 0.5\ntokenizer_source: union\n")
    proc = cli("run", recipe, "-o", tmp_path / "recipe", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert _files(str(tmp_path / "recipe")) == _files(str(tmp_path / "one"))


@pytest.mark.parametrize("mode", ["a", "b"])
def test_one_parents_vocabulary_takes_the_others_rows_by_string(kinds, mode, ray_head, tmp_path):
    a, b = kinds["sentencepiece"]
    out = str(tmp_path / "child")
    raymerge.merge(a, b, out, t=0.6, vocab=mode, workers=2)
    _check_child(out, a, b, 0.6, mode)
    keep = a if mode == "a" else b
    with open(os.path.join(out, "tokenizer.json"), "rb") as f, open(os.path.join(keep, "tokenizer.json"), "rb") as g:
        assert f.read() == g.read(), "the child keeps that parent's tokenizer"
    import json

    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["vocab_size"] == len(_vocab(keep))


@pytest.mark.parametrize("fill", ["mean", "zeros"])
def test_union_fills_missing_tokens_as_asked(kinds, fill, ray_head, tmp_path):
    a, b = kinds["sentencepiece"]
    out = str(tmp_path / "child")
    raymerge.merge(a, b, out, t=0.5, vocab="union", pad=fill, workers=2)
    _check_child(out, a, b, 0.5, "union", fill)


def test_gradient_is_refused_with_rows_aligned_by_string(kinds, cli, tmp_path):
    a, b = kinds["sentencepiece"]
    proc = cli("merge", a, b, "-o", tmp_path / "out", "--pad", "gradient")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "raymerge: error: --pad gradient extends appended ids only; rows aligned by token string take "
        "the other parent's row (--pad copy, the default), or --pad mean or zeros"]
    assert not (tmp_path / "out").exists()


def test_plan_shows_the_alignment_and_saves_the_token_map(kinds, cli, tmp_path):
    import pyarrow.parquet as pq

    a, b = kinds["sentencepiece"]
    save = tmp_path / "plan.parquet"
    proc = cli("plan", a, b, "--save", save)
    assert proc.returncode == 0, proc.stderr
    n = len(_vocab(a))
    assert f"the tokenizers first differ at id {n - 2}" in proc.stdout
    assert "2 token(s) only B has, appended after A's: '<pad>', '<tool>'" in proc.stdout
    assert "1 token(s) at different ids in the parents, matched by string" in proc.stdout
    assert "rows filled with the other parent's row: 2 for parent A, 1 for parent B" in proc.stdout
    rows = pq.read_table(tmp_path / "plan.tokens.parquet").to_pylist()
    by_token = {r["token"]: r for r in rows}
    assert by_token["<|im_end|>"]["a_row"] == n - 1 and by_token["<|im_end|>"]["b_row"] == n - 2
    assert by_token["<|im_start|>"]["b_row"] == -1 and by_token["<tool>"]["a_row"] == -1


def test_an_unreadable_tokenizer_falls_back_to_ids_unless_string_alignment_is_asked(kinds, cli, tmp_path):
    a, b = kinds["sentencepiece"]
    broken = tmp_path / "broken"
    shutil.copytree(b, broken)
    (broken / "tokenizer.json").write_text("{not json")
    os.remove(broken / "tokenizer.model")
    proc = cli("plan", a, broken)
    assert proc.returncode == 0, proc.stderr
    assert "note: parent B: " in proc.stdout and "transformers cannot load its tokenizer" in proc.stdout
    assert "rows are matched by id" in proc.stdout
    proc = cli("plan", a, broken, "--vocab", "union")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("raymerge: error: "), proc.stderr
    assert "cannot load its tokenizer" in lines[0], proc.stderr
