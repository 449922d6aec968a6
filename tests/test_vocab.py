"""Parents with different vocabularies, tied embeddings, and the shape checks (issue: padder)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import raymerge
from raymerge.align import PadSpec, pad_rows
from raymerge.synthetic import build_parent, llama_config
from reference import assert_within_one_ulp, load_dir, mergekit_style_slerp

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1)


def expected_padded(s: torch.Tensor, long: torch.Tensor, strategy: str) -> torch.Tensor:
    """The short parent extended to the long one's rows, straight from DESIGN.md's formulas."""
    n, N = s.shape[0], long.shape[0]
    k = N - n
    s32 = s.float()
    if strategy == "zeros":
        new = torch.zeros(k, *s.shape[1:])
    elif strategy == "copy":
        new = long[n:].float()
    elif strategy == "mean":
        new = s.double().mean(dim=0).float().expand(k, *s.shape[1:])
    else:
        j = torch.arange(1, k + 1, dtype=torch.float32).reshape(k, *([1] * (s.dim() - 1)))
        new = s32[n - 1] + (j / k) * (long[N - 1].float() - s32[n - 1])
    return torch.cat([s32, new])


@pytest.fixture(scope="module")
def vocab_parents(session_dir):
    base = llama_config(vocab_size=32000, **SMALL)
    root = session_dir / "vocab"
    return {
        32000: build_parent(str(root / "v32000"), base, seed=11),
        32001: build_parent(str(root / "v32001"), llama_config(vocab_size=32001, **SMALL), seed=12,
                            base=(base, 11), base_vocab=32000),
        32032: build_parent(str(root / "v32032"), llama_config(vocab_size=32032, **SMALL), seed=13,
                            base=(base, 11), base_vocab=32000),
    }


def test_pad_rows_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(10, 4, generator=g).to(torch.bfloat16)
    long = torch.randn(13, 4, generator=g).to(torch.bfloat16)
    for strategy in ("gradient", "zeros", "copy", "mean"):
        spec = PadSpec(0, "a", 10, 13, strategy)
        got = pad_rows(spec, range(10, 13), s[9], long[12], l_rows=long[10:13],
                       s_mean=s.double().mean(0).float())
        want = expected_padded(s, long, strategy)[10:]
        assert torch.allclose(got, want, rtol=0, atol=1e-6), strategy
    grad = pad_rows(PadSpec(0, "a", 10, 13, "gradient"), range(10, 13), s[9], long[12])
    assert torch.equal(grad[-1], long[12].float()), "the last new entry is exactly L[N-1]"


# (A, B, strategy): the longer parent second and first, +1 and +32 rows, every strategy.
CASES = [(32000, 32032, "gradient"), (32000, 32032, "zeros"), (32000, 32032, "copy"),
         (32000, 32032, "mean"), (32001, 32000, "gradient"), (32032, 32000, "mean")]


@pytest.mark.parametrize("va,vb,strategy", CASES)
def test_vocab_padding_end_to_end(vocab_parents, ray_head, tmp_path, va, vb, strategy):
    a, b = vocab_parents[va], vocab_parents[vb]
    out = str(tmp_path / "child")
    raymerge.merge(a, b, out, t=0.4, pad=strategy, workers=2)
    pa, pb, child = load_dir(a), load_dir(b), load_dir(out)
    big = max(va, vb)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        xa, xb = pa[name], pb[name]
        if va < vb:
            xa = expected_padded(xa, xb, strategy)
        else:
            xb = expected_padded(xb, xa, strategy)
        assert child[name].shape[0] == big
        assert_within_one_ulp(child[name], mergekit_style_slerp(0.4, xa, xb), name)
    for name in child:
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert_within_one_ulp(child[name], mergekit_style_slerp(0.4, pa[name], pb[name]), name)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == big

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == big
    model = AutoModelForCausalLM.from_pretrained(out)
    new_token = "<extra_0>"
    ids = tok(f"w1 w2 {new_token}", return_tensors="pt").input_ids
    assert ids[0, -1].item() == 32000, "the added token is the first new row"
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3


def test_tokenizer_files_follow_the_merged_vocabulary(vocab_parents, ray_head, tmp_path):
    out = str(tmp_path / "child")
    raymerge.merge(vocab_parents[32000], vocab_parents[32032], out, t=0.5, tokenizer_from="a", workers=1)
    with open(os.path.join(out, "tokenizer.json")) as f, open(os.path.join(vocab_parents[32000], "tokenizer.json")) as g:
        assert f.read() == g.read(), "--tokenizer-from a overrides the default (B, the longer)"


@pytest.fixture(scope="module")
def tied_parents(session_dir):
    root = session_dir / "tied"
    tied_cfg = llama_config(vocab_size=500, tie_word_embeddings=True, **SMALL)
    untied_cfg = llama_config(vocab_size=500, tie_word_embeddings=False, **SMALL)
    return {
        "tied-1": build_parent(str(root / "t1"), tied_cfg, seed=21),
        "tied-2": build_parent(str(root / "t2"), tied_cfg, seed=22, base=(tied_cfg, 21)),
        "untied": build_parent(str(root / "u"), untied_cfg, seed=23, base=(tied_cfg, 21)),
    }


def test_both_tied_gives_a_tied_child(tied_parents, ray_head, tmp_path):
    out = str(tmp_path / "child")
    raymerge.merge(tied_parents["tied-1"], tied_parents["tied-2"], out, t=0.5, workers=2)
    child = load_dir(out)
    assert "lm_head.weight" not in child
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is True


@pytest.mark.parametrize("tied_first", [True, False])
def test_one_tied_gives_an_untied_child(tied_parents, ray_head, tmp_path, tied_first):
    t_dir, u_dir = tied_parents["tied-1"], tied_parents["untied"]
    a, b = (t_dir, u_dir) if tied_first else (u_dir, t_dir)
    out = str(tmp_path / "child")
    raymerge.merge(a, b, out, t=0.3, workers=2)
    pa, pb, child = load_dir(a), load_dir(b), load_dir(out)
    head_a = pa.get("lm_head.weight", pa["model.embed_tokens.weight"])
    head_b = pb.get("lm_head.weight", pb["model.embed_tokens.weight"])
    assert_within_one_ulp(child["lm_head.weight"], mergekit_style_slerp(0.3, head_a, head_b), "lm_head")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is False
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, child["lm_head.weight"])


def _cli_error(cli, *args) -> str:
    proc = cli(*args)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymerge: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_hidden_size_mismatch_is_refused_naming_the_attribute(vocab_parents, session_dir, cli, tmp_path):
    wide = build_parent(str(session_dir / "vocab" / "wide"),
                        llama_config(vocab_size=32000, **{**SMALL, "hidden_size": 48}), seed=32)
    msg = _cli_error(cli, "merge", vocab_parents[32000], wide, "-o", tmp_path / "out", "-t", "0.5")
    assert "hidden_size (A 32, B 48)" in msg
    assert not (tmp_path / "out").exists()


def test_plan_shows_padding_and_saves_parquet(vocab_parents, cli, tmp_path):
    import pyarrow.parquet as pq

    save = tmp_path / "plan.parquet"
    proc = cli("plan", vocab_parents[32000], vocab_parents[32032], "--pad", "mean", "--save", save)
    assert proc.returncode == 0, proc.stderr
    assert "model.embed_tokens.weight: parent A 32000 -> 32032 rows on axis 0 (mean)" in proc.stdout
    assert "tokenizer from parent B" in proc.stdout
    table = pq.read_table(save).to_pylist()
    rows = {r["name"]: r for r in table}
    assert rows["lm_head.weight"]["pad_N"] == 32032 and rows["lm_head.weight"]["pad_short"] == "a"
    assert rows["model.norm.weight"]["pad_strategy"] is None


def _with_extra_tensor(src: str, dst: str, name: str, tensor: torch.Tensor) -> str:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors[name] = tensor
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_vocabulary_axis_other_than_the_first_is_refused(vocab_parents, cli, tmp_path):
    """A tensor whose only differing axis is axis 1, with the vocabulary sizes 32000 and 32032
    there: the padder extends rows only, so it is refused, naming the tensor and both shapes."""
    name = "model.vocab_proj.weight"
    a = _with_extra_tensor(vocab_parents[32000], str(tmp_path / "a"), name, torch.zeros(32, 32000, dtype=torch.bfloat16))
    b = _with_extra_tensor(vocab_parents[32032], str(tmp_path / "b"), name, torch.zeros(32, 32032, dtype=torch.bfloat16))
    msg = _cli_error(cli, "merge", a, b, "-o", tmp_path / "out")
    assert msg == (f"raymerge: error: tensor '{name}': shapes differ, A [32, 32000] vs B [32, 32032]: "
                   "the vocabulary axis must be the first one"), msg
    assert not (tmp_path / "out").exists()


def test_equal_vocabularies_take_parent_a_tokenizer_files(tiny_parents, ray_head, tmp_path):
    """Equal vocabulary sizes: the child's tokenizer files are A's, byte for byte, even though B's
    tokenizer_config.json differs (a harmless model_max_length)."""
    import shutil

    a, b = tiny_parents
    b2 = str(tmp_path / "b")
    shutil.copytree(b, b2)
    config_path = os.path.join(b2, "tokenizer_config.json")
    with open(config_path) as f:
        tok_config = json.load(f)
    assert tok_config.get("model_max_length") != 2048
    tok_config["model_max_length"] = 2048
    with open(config_path, "w") as f:
        json.dump(tok_config, f, indent=2)
    out = str(tmp_path / "child")
    raymerge.merge(a, b2, out, t=0.5, workers=1)
    # The tokenizer files the README lists: the child holds exactly A's, with A's bytes.
    listed = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
              "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
    names = [f for f in listed if os.path.isfile(os.path.join(a, f))]
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    assert [f for f in listed if os.path.isfile(os.path.join(out, f))] == names
    for f in names:
        with open(os.path.join(out, f), "rb") as got, open(os.path.join(a, f), "rb") as want:
            assert got.read() == want.read(), f
    with open(os.path.join(out, "tokenizer_config.json"), "rb") as got, open(config_path, "rb") as b_file:
        assert got.read() != b_file.read(), "B's tokenizer_config.json must not be the one copied"
