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


# --- byte-level BPE bases -------------------------------------------------------------------

FIXTURES = __import__("pathlib").Path(__file__).resolve().parent.parent / "fixtures"

# Llama-3's pre-tokenizer: the GPT-4 split regex, then bytes -> characters without a regex.
GPT4_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_NEW = 1500  # new tokens in the test extensions (trained on ~4,000 lines in ~2 s)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2's tokenizer directory (tests/fixtures, Apache-2.0)."""
    return FIXTURES / "smollm2_tokenizer"


@pytest.fixture(scope="session")
def llama3_style(corpus_lines):
    """A Llama-3-style byte-level BPE built from scratch: GPT-4 regex as a Split
    pre-tokenizer, ByteLevel(use_regex=False), ignore_merges=True, 4,000 tokens trained on
    English, and two special tokens appended after the model vocabulary (as Llama-3's)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([ln for ln in corpus_lines["en_d2l"] if ln.strip()], trainer)
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in ("<|bot|>", "<|eot|>")]
    )
    return tok


@pytest.fixture(scope="session")
def bpe_train_lines():
    """About 4,000 Chinese training lines of the held-out protocol (modern + classical)."""
    from llamazh.tokenizer import chinese_held_out_split

    train = chinese_held_out_split().train
    return [*train[:2500], *train[-1500:]]


@pytest.fixture(scope="session")
def bpe_bases(smollm2_dir, llama3_style):
    """family -> base tokenizers.Tokenizer."""
    from tokenizers import Tokenizer

    return {
        "smollm2": Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")),
        "llama3": llama3_style,
    }


@pytest.fixture(scope="session")
def bpe_extensions(smollm2_dir, llama3_style, bpe_train_lines):
    """family -> BPEExtension with BPE_NEW new tokens."""
    from llamazh.tokenizer import extend_bpe

    return {
        "smollm2": extend_bpe(smollm2_dir, bpe_train_lines, new_tokens=BPE_NEW),
        "llama3": extend_bpe(llama3_style, bpe_train_lines, new_tokens=BPE_NEW),
    }
