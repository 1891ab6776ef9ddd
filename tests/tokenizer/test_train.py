from __future__ import annotations

import re

import pytest
import sentencepiece as spm

from llamazh.tokenizer import TRAIN_DEFAULTS, train_sentencepiece
from llamazh.tokenizer._proto import NORMAL, load_proto


def test_trained_model_follows_the_defaults(zh_model_path):
    proto = load_proto(zh_model_path, "model")
    assert len(proto.pieces) == 2000
    assert proto.trainer_spec.model_type == proto.trainer_spec.BPE
    assert proto.normalizer_spec.name == "identity"
    assert proto.normalizer_spec.add_dummy_prefix
    assert not proto.normalizer_spec.remove_extra_whitespaces
    assert [proto.pieces[i].piece for i in range(3)] == ["<unk>", "<s>", "</s>"]
    normal = [p.piece for p in proto.pieces if p.type == NORMAL]
    # split_digits: no piece holds a digit next to anything else
    assert not [p for p in normal if re.search(r"\d", p) and len(p.strip("\u2581")) > 1]
    assert TRAIN_DEFAULTS["byte_fallback"] and proto.trainer_spec.byte_fallback


def test_overrides_reach_the_trainer(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world\nthe quick brown fox\n" * 50, encoding="utf-8")
    out = train_sentencepiece(
        [text], tmp_path / "m.model", vocab_size=40, byte_fallback=False, character_coverage=1.0
    )
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert sp.get_piece_size() == 40
    assert not load_proto(out, "m").trainer_spec.byte_fallback


def test_empty_corpus_is_refused(tmp_path):
    text = tmp_path / "empty.txt"
    text.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"files=.*no non-empty line"):
        train_sentencepiece(text, tmp_path / "m.model", vocab_size=300)
    assert not (tmp_path / "m.model").exists()


def test_vocab_size_the_corpus_cannot_support(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("你好世界\n今天天气很好\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size=5000"):
        train_sentencepiece(text, tmp_path / "m.model", vocab_size=5000)
    assert list(tmp_path.iterdir()) == [text]


def test_bad_arguments(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(b"\xff\xfe not utf-8\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        train_sentencepiece(text, tmp_path / "m.model", vocab_size=300)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        train_sentencepiece(tmp_path / "missing.txt", tmp_path / "m.model")
    with pytest.raises(ValueError, match="model_prefix"):
        train_sentencepiece(text, tmp_path / "m.model", model_prefix="x")
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        train_sentencepiece(text, tmp_path / "m.model", vocab_size=0)
    good = tmp_path / "g.txt"
    good.write_text("hello world\n" * 20, encoding="utf-8")
    with pytest.raises(ValueError, match="unknown field name"):
        train_sentencepiece(good, tmp_path / "m.model", vocab_size=100, no_such_flag=1)


def test_existing_output_is_kept(tmp_path, zh_model_path):
    out = tmp_path / "m.model"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="output="):
        train_sentencepiece(zh_model_path, out, vocab_size=300)
    assert out.read_bytes() == b"keep me"
