from __future__ import annotations

import pytest

from llamazh.tokenizer import build_fast_tokenizer, encoding_efficiency


def test_llama2_reference_and_backends_agree(llama2_model_path, corpus_path):
    zh = corpus_path("zh_d2l.txt")
    fast = build_fast_tokenizer(llama2_model_path)
    report = encoding_efficiency({"sp": llama2_model_path, "fast": fast}, [zh])
    sp, hf = report.get("sp", "zh_d2l"), report.get("fast", "zh_d2l")
    assert (sp.tokens, sp.chars, sp.byte_tokens) == (hf.tokens, hf.chars, hf.byte_tokens)
    assert 0.44 < sp.tokens_per_char < 0.47  # NOTES.md: 0.462 (counting differs slightly)
    assert sp.byte_fallback_rate > 0.1  # Llama-2 spells many Chinese characters in bytes
    assert sp.chars_per_token == pytest.approx(1 / sp.tokens_per_char)


def test_table_and_dict(llama2_model_path, merged_rank):
    texts = {"zh": ["深度学习模型", "你好，世界"], "emoji": ["😀🚀"]}
    report = encoding_efficiency({"llama2": llama2_model_path, "merged": merged_rank}, texts)
    d = report.as_dict()
    assert set(d) == {"llama2", "merged"} and set(d["llama2"]) == {"zh", "emoji"}
    assert d["llama2"]["emoji"]["byte_fallback_rate"] == 8 / 9  # "▁" + 8 bytes
    assert d["llama2"]["zh"]["relative_tokens"] == 1.0
    assert d["merged"]["zh"]["tokens"] < d["llama2"]["zh"]["tokens"]
    table = report.table()
    assert "tokens/char" in table and "merged" in table and "emoji" in table
    assert len(table.splitlines()) == 2 + 4


def test_hf_tokenizer_from_transformers(tmp_path, merged_rank):
    from transformers import AutoTokenizer

    from llamazh.tokenizer import export_hf_tokenizer

    hf = AutoTokenizer.from_pretrained(str(export_hf_tokenizer(merged_rank, tmp_path / "t")))
    texts = ["深度学习 is fun", "  spaces  "]
    a = encoding_efficiency({"hf": hf, "sp": merged_rank}, {"t": texts}).as_dict()
    assert a["hf"]["t"]["tokens"] == a["sp"]["t"]["tokens"]


def test_bad_arguments(llama2_model_path, tmp_path):
    with pytest.raises(ValueError, match="texts is empty"):
        encoding_efficiency([llama2_model_path], {})
    with pytest.raises(ValueError, match=r"texts\['x'\] holds no text"):
        encoding_efficiency([llama2_model_path], {"x": []})
    with pytest.raises(TypeError, match="must be a SentencePiece model"):
        encoding_efficiency({"t": object()}, {"x": ["a"]})
    with pytest.raises(FileNotFoundError, match="is not an existing file"):
        encoding_efficiency([llama2_model_path], [tmp_path / "none.txt"])


def test_byte_level_bpe_kinds(bpe_extensions, smollm2_dir, tmp_path):
    """A BPEExtension, a tokenizer directory, a tokenizer.json path, a tokenizers.Tokenizer
    and a transformers tokenizer measure alike."""
    from transformers import AutoTokenizer

    ext = bpe_extensions["smollm2"]
    out = ext.save(tmp_path / "ext")
    texts = {"zh": ["深度学习模型", "你好，世界 and English"]}
    kinds = {
        "ext": ext,
        "dir": out,
        "json": out / "tokenizer.json",
        "tokenizer": ext.tokenizer,
        "hf": AutoTokenizer.from_pretrained(str(out)),
    }
    d = encoding_efficiency(kinds, texts).as_dict()
    assert len({d[k]["zh"]["tokens"] for k in kinds}) == 1
    base = encoding_efficiency({"base": smollm2_dir}, texts).as_dict()["base"]["zh"]["tokens"]
    assert d["ext"]["zh"]["tokens"] < base


def test_held_out_split():
    from llamazh.tokenizer import CJK_HEAVY, chinese_held_out_split, cjk_share

    assert cjk_share("深度学习 is") == 4 / 7 and cjk_share("") == 0.0 and CJK_HEAVY == 0.3
    split = chinese_held_out_split()
    held = split.held_out
    assert {k: len(v) for k, v in held.items()} == {
        "zh_d2l": 258,
        "zh_classical": 2000,
        "en_d2l": 4444,
    }
    # by position: every other line trains (the corpora repeat a few lines verbatim)
    assert len(split.train) == (5615 - 258) + (13918 - 2000) == 17275
    assert "17275 training lines" in str(split)
    assert all(cjk_share(line) >= 0.3 for line in held["zh_d2l"])
    assert split.train[-1] != held["zh_classical"][-1]
