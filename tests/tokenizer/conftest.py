"""Shared fixtures for the tokenizer tests: small SentencePiece models trained once a session.

The Chinese model is trained on the first 2,000 lines of zh_d2l and 500 of zh_classical with
2,000 pieces (character coverage 0.995 so that they fit): under a second on 2 cores, enough to
exercise every merge rule.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

from llamazh.tokenizer import merge_sentencepiece, train_sentencepiece

ZH_VOCAB = 2000


@pytest.fixture(scope="session")
def zh_model_path(tmp_path_factory, corpus_path):
    root = tmp_path_factory.mktemp("zh")
    text = root / "zh.txt"
    d2l = corpus_path("zh_d2l.txt").read_text(encoding="utf-8").splitlines()[:2000]
    classical = corpus_path("zh_classical.txt").read_text(encoding="utf-8").splitlines()[:500]
    text.write_text("\n".join(d2l + classical) + "\n", encoding="utf-8")
    return train_sentencepiece(
        text, root / "zh.model", vocab_size=ZH_VOCAB, character_coverage=0.995
    )


@pytest.fixture(scope="session")
def merged_rank(llama2_model_path, zh_model_path):
    return merge_sentencepiece(llama2_model_path, zh_model_path, scores="rank")


@pytest.fixture(scope="session")
def merged_seed(llama2_model_path, zh_model_path):
    return merge_sentencepiece(llama2_model_path, zh_model_path, scores="seed")


@pytest.fixture(scope="session")
def corpus_lines(corpus_path):
    """name -> every line of data/corpus/<name>.txt (empty lines included)."""
    return {
        name: corpus_path(f"{name}.txt").read_text(encoding="utf-8").split("\n")
        for name in ("zh_d2l", "en_d2l", "zh_classical")
    }


# Text the promises are about: Chinese, English, digits, emoji, whitespace runs, leading and
# trailing spaces. Excluded: U+2581 (SentencePiece reads it as a space, so no tokenizer
# round-trips it) and surrogates (not encodable).
_CHUNKS = st.one_of(
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=8),
    st.sampled_from(list("的是在了一不和有大这中国人们学习模型数据，。！？：（）《》、")),
    st.text(st.characters(min_codepoint=ord("a"), max_codepoint=ord("z")), max_size=8),
    st.sampled_from(["Hello", "the", "GPU", "Transformer", "don't", "e.g.", "3.14"]),
    st.text(st.characters(min_codepoint=ord("0"), max_codepoint=ord("9")), min_size=1),
    st.sampled_from(["😀", "🚀", "👍🏽", "🇨🇳", "∑", "é", "ß", "한국어", "日本語", "\u200b"]),
    st.text(st.sampled_from(" \n\t"), min_size=1, max_size=6),
    st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"),
)


@pytest.fixture(scope="session")
def mixed_text() -> st.SearchStrategy[str]:
    """Hypothesis strategy (draw it with ``data.draw``): mixed-script text."""
    return st.lists(_CHUNKS, max_size=12).map("".join)


@pytest.fixture(scope="session")
def pieces_text():
    """A function: proto -> strategy of concatenated normal pieces of that model, where
    merge-order conflicts live."""

    def strategy(proto) -> st.SearchStrategy[str]:
        pieces = [
            p.piece.replace("\u2581", " ")
            for p in proto.pieces
            if p.type == p.NORMAL and len(p.piece) > 1
        ]
        return st.lists(st.sampled_from(pieces), min_size=1, max_size=10).map("".join)

    return strategy
