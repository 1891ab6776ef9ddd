from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given
from hypothesis import strategies as st

from llamazh.tokenizer import MergeResult, merge_sentencepiece
from llamazh.tokenizer._proto import CONTROL, NORMAL, UNUSED, USER_DEFINED, load_proto

_PIECE = st.text(st.sampled_from("▁abcxyz的是中国人学习"), min_size=1, max_size=4)
_TYPE = st.sampled_from([NORMAL, NORMAL, NORMAL, USER_DEFINED, UNUSED, CONTROL])


@st.composite
def extra_models(draw, base):
    """A loadable SentencePiece model whose pieces mix new and base pieces of every type."""
    proto = load_proto(base, "base")
    specials = list(proto.pieces[:3])
    known = [p.piece for p in proto.pieces[300:400]]
    pieces = draw(
        st.lists(st.one_of(_PIECE, st.sampled_from(known)), unique=True, max_size=40).filter(
            lambda ps: not {"<unk>", "<s>", "</s>"} & set(ps)
        )
    )
    del proto.pieces[:]
    proto.trainer_spec.byte_fallback = False
    for sp in specials:
        proto.pieces.add().CopyFrom(sp)
    for i, piece in enumerate(pieces):
        new = proto.pieces.add()
        new.piece, new.type, new.score = piece, draw(_TYPE), -float(i)
    return proto


@st.composite
def merge_cases(draw):
    return draw(st.sampled_from(["seed", "rank"])), draw(st.sampled_from([None, 1, 8, 64]))


def _check_invariants(base, extra, result: MergeResult, scores, pad):
    n = len(base.pieces)
    merged = result.proto
    assert result.base_size == n
    for i in range(n):  # base pieces, ids, scores, types never change
        assert (merged.pieces[i].piece, merged.pieces[i].score, merged.pieces[i].type) == (
            base.pieces[i].piece,
            base.pieces[i].score,
            base.pieces[i].type,
        )
    have = {p.piece for p in base.pieces}
    expected = []
    for p in extra.pieces:
        if p.type == NORMAL and p.piece not in have:
            expected.append(p.piece)
            have.add(p.piece)
    added = [p.piece for p in merged.pieces[n : n + len(expected)]]
    assert added == expected == list(result.added)
    new = merged.pieces[n : n + len(expected)]
    assert all(p.type == NORMAL for p in new)
    if scores == "seed":
        assert all(p.score == 0.0 for p in new)
    else:
        s = np.array([p.score for p in new], dtype=np.float32)
        assert (np.diff(s) < 0).all()
        assert s.size == 0 or s[0] < min(p.score for p in base.pieces)
    tail = merged.pieces[n + len(expected) :]
    assert [p.piece for p in tail] == list(result.padding)
    assert all(p.type == UNUSED for p in tail)
    assert len({p.piece for p in merged.pieces}) == len(merged.pieces)
    if pad:
        assert result.final_size % pad == 0 and len(tail) < pad
    else:
        assert not tail


@given(data=st.data())
def test_merge_invariants_on_drawn_models(zh_model_path, data):
    extra = data.draw(extra_models(zh_model_path))
    scores, pad = data.draw(merge_cases())
    base = load_proto(zh_model_path, "base")
    result = merge_sentencepiece(base, extra, scores=scores, pad_to_multiple=pad)
    _check_invariants(base, extra, result, scores, pad)
    again = merge_sentencepiece(result, extra, scores=scores, pad_to_multiple=pad)
    assert again.added == () and again.padding == ()
    assert again.proto.SerializeToString() == result.proto.SerializeToString()
    spm.SentencePieceProcessor(model_proto=result.proto.SerializeToString())  # loads


@pytest.mark.parametrize("scores", ["seed", "rank"])
def test_llama2_merge(llama2_model_path, zh_model_path, scores):
    base, extra = load_proto(llama2_model_path, "b"), load_proto(zh_model_path, "e")
    result = merge_sentencepiece(llama2_model_path, zh_model_path, scores=scores)
    _check_invariants(base, extra, result, scores, None)
    normal = sum(p.type == NORMAL for p in extra.pieces)
    assert len(result.added) + result.skipped_present == normal
    assert result.skipped_special == len(extra.pieces) - normal
    assert result.as_dict()["final_size"] == 32000 + len(result.added)
    assert "32000 base" in str(result)


def test_seed_ordering_is_the_extra_models(merged_seed, zh_model_path):
    extra = load_proto(zh_model_path, "e")
    order = {p.piece: i for i, p in enumerate(extra.pieces)}
    positions = [order[p] for p in merged_seed.added]
    assert positions == sorted(positions)


def test_padding_pieces_are_never_emitted(llama2_model_path, zh_model_path, corpus_lines):
    result = merge_sentencepiece(llama2_model_path, zh_model_path, pad_to_multiple=128)
    assert result.final_size % 128 == 0 and result.padding[0] == "<unused_0>"
    sp = spm.SentencePieceProcessor(model_proto=result.proto.SerializeToString())
    first_pad = result.final_size - len(result.padding)
    lines = [*corpus_lines["zh_d2l"][:500], " ".join(result.padding), "<unused_0><unused_1>"]
    assert max(max(ids, default=0) for ids in sp.encode(lines)) < first_pad
    # numbering skips names already taken
    again = merge_sentencepiece(result, zh_model_path, pad_to_multiple=result.final_size + 1)
    assert again.padding == (f"<unused_{len(result.padding)}>",)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, merged_rank):
    path = merged_rank.save(tmp_path / "m.model")
    assert load_proto(path, "m").SerializeToString() == merged_rank.proto.SerializeToString()
    with pytest.raises(FileExistsError, match="path="):
        merged_rank.save(path)
    merged_rank.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.model"]


@given(cut=st.integers(min_value=1, max_value=499_000))
def test_truncated_model_is_refused(llama2_model_path, tmp_path_factory, cut):
    path = tmp_path_factory.mktemp("cut") / "cut.model"
    path.write_bytes(llama2_model_path.read_bytes()[:cut])
    with pytest.raises(ValueError, match=r"base=.*(not a SentencePiece model|truncated)"):
        merge_sentencepiece(path, llama2_model_path)


def test_bad_inputs(tmp_path, llama2_model_path, corpus_path):
    with pytest.raises(ValueError, match=r"extra=.*not a SentencePiece model"):
        merge_sentencepiece(llama2_model_path, corpus_path("en_d2l.txt"))
    with pytest.raises(FileNotFoundError, match="extra="):
        merge_sentencepiece(llama2_model_path, tmp_path / "nope.model")
    with pytest.raises(TypeError, match="base must be a path"):
        merge_sentencepiece(3, llama2_model_path)
    with pytest.raises(ValueError, match="scores must be one of"):
        merge_sentencepiece(llama2_model_path, llama2_model_path, scores="best")
    with pytest.raises(ValueError, match="pad_to_multiple must be >= 1"):
        merge_sentencepiece(llama2_model_path, llama2_model_path, pad_to_multiple=0)
    unigram = load_proto(llama2_model_path, "b")
    unigram.trainer_spec.model_type = unigram.trainer_spec.UNIGRAM
    with pytest.raises(ValueError, match="base must be a BPE"):
        merge_sentencepiece(unigram, llama2_model_path)


def test_cjk_filter_keeps_english_tokenization(llama2_model_path, zh_model_path, corpus_lines):
    from llamazh.tokenizer import has_cjk

    result = merge_sentencepiece(llama2_model_path, zh_model_path, piece_filter=has_cjk)
    assert result.added and all(has_cjk(p) for p in result.added)
    full = merge_sentencepiece(llama2_model_path, zh_model_path)
    assert result.skipped_filtered == len(full.added) - len(result.added) > 0
    assert "filtered out" in str(result)
    base = spm.SentencePieceProcessor(model_file=str(llama2_model_path))
    merged = spm.SentencePieceProcessor(model_proto=result.proto.SerializeToString())
    english = corpus_lines["en_d2l"][:1000]
    assert merged.encode(english) == base.encode(english)


def _original_chinese_llama_merge(base, extra):
    """Chinese-LLaMA's merge_tokenizers.py, restated: append every piece the base lacks,
    score 0, default type (their extra model's specials are all in LLaMA already)."""
    merged = load_proto(base, "base")
    have = {p.piece for p in merged.pieces}
    for p in load_proto(extra, "extra").pieces:
        if p.piece not in have:
            new = merged.pieces.add()
            new.piece, new.score = p.piece, 0
    return merged


def test_seed_is_the_original_procedure(llama2_model_path, zh_model_path, merged_seed):
    want = _original_chinese_llama_merge(llama2_model_path, zh_model_path)
    got = merged_seed.proto
    assert [(p.piece, p.score, p.type) for p in got.pieces] == [
        (p.piece, p.score, p.type) for p in want.pieces
    ]


CHINESE_LLAMA = Path(__file__).resolve().parent.parent / "fixtures" / "chinese_llama"


def test_published_chinese_llama_vocabulary(llama2_model_path):
    """Llama + Chinese-LLaMA's chinese_sp.model = their published 49,953-piece model, byte for
    byte (its sha256 begins e2676d4ca29ca175; the file itself is not bundled)."""
    extra = CHINESE_LLAMA / "chinese_sp.model"
    result = merge_sentencepiece(llama2_model_path, extra, scores="seed")
    assert (result.final_size, len(result.added)) == (49953, 17953)
    assert result.skipped_present + result.skipped_special == 20000 - 17953
    data = result.proto.SerializeToString()
    assert len(data) == 757_958
    assert hashlib.sha256(data).hexdigest().startswith("e2676d4ca29ca175")
    # the published script, restated, writes the same bytes
    assert _original_chinese_llama_merge(llama2_model_path, extra).SerializeToString() == data


def test_published_chinese_llama2_vocabulary(llama2_model_path, corpus_path):
    """Chinese-LLaMA-2's 55,296 pieces: Llama-2's 32,000 unchanged, <pad> at 32000, then
    23,295 Chinese pieces, all score 0; 0.69x Llama-2's tokens on zh_d2l (NOTES.md)."""
    from llamazh.tokenizer import encoding_efficiency

    v2 = load_proto(CHINESE_LLAMA / "chinese_llama2_tokenizer.model", "v2")
    llama2 = load_proto(llama2_model_path, "llama2")
    assert len(v2.pieces) == 55296 == 432 * 128
    assert [(p.piece, p.score, p.type) for p in v2.pieces[:32000]] == [
        (p.piece, p.score, p.type) for p in llama2.pieces
    ]
    assert v2.pieces[32000].piece == "<pad>"
    assert all(p.score == 0 and p.type == NORMAL for p in v2.pieces[32001:])
    assert len(v2.pieces[32001:]) == 23295
    report = encoding_efficiency(
        {"llama2": llama2_model_path, "v2": v2}, [corpus_path("zh_d2l.txt")]
    )
    # NOTES.md counts slightly differently (0.462 and 0.319); the ratio is the same, 0.69
    assert 0.44 < report.get("llama2", "zh_d2l").tokens_per_char < 0.47
    assert 0.30 < report.get("v2", "zh_d2l").tokens_per_char < 0.32
    assert report.as_dict()["v2"]["zh_d2l"]["relative_tokens"] == pytest.approx(0.69, abs=0.01)
    assert report.get("v2", "zh_d2l").byte_fallback_rate < 1e-4  # Llama-2: 22.6%
