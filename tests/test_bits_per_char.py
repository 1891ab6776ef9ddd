"""bits_per_char against a plain reference: one text at a time, no padding, no batching; texts
longer than the context are read in windows that score every token once."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamazh.evaluation import bits_per_char, context_windows, document_boundary
from llamazh.testing import tiny_llama

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "smollm2_tokenizer"
TEXTS = ["中国的首都是北京。", "Hello world.", "深度学习是机器学习的一个分支，它使用多层神经网络。",
         "a", "混合 mixed 文本 text, 123!"]  # fmt: skip
# the same fp32 losses summed in another order (batches, windows): relative tolerance
REL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=64)


def _nll_bits(model, seq: list[int], first: int = 1) -> float:
    """Summed NLL in bits of ``seq[first:]``, the model reading ``seq`` alone."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    nll = -logp.gather(1, targets[:, None])[:, 0]
    return float(nll[first - 1 :].sum()) / math.log(2)


class _Bigram(torch.nn.Module):
    """Logits that depend on the current token only: the context a window keeps changes
    nothing, so any windowing must give exactly the whole-text value."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = torch.randn(vocab, 16), torch.randn(vocab, 16)
        self.config = SimpleNamespace(max_position_embeddings=8)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.inp[input_ids] @ self.out.T)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), max_length=st.integers(2, 20), data=st.data())
def test_windows_score_every_token_once_with_the_promised_context(n, max_length, data):
    stride = data.draw(st.integers(1, max_length - 1))
    windows = context_windows(n, max_length, stride)
    scored = [k for _, end, first in windows for k in range(first, end)]
    assert scored == list(range(1, n))
    assert windows[0][0] == 0 and windows[-1][1] == n
    for start, end, first in windows:
        assert 0 < end - start <= max_length and start < first <= end
    for start, _, first in windows[1:]:
        assert first - start == max_length - stride  # the context each later window keeps
    if n <= max_length:
        assert windows == [(0, n, 1)]


@settings(max_examples=15, deadline=None)
@given(
    picks=st.lists(st.sampled_from(TEXTS), min_size=1, max_size=5),
    max_batch_tokens=st.integers(1, 200),
)
def test_batched_equals_one_text_at_a_time(tokenizer, model, picks, max_batch_tokens):
    prefix = document_boundary(tokenizer)
    total = sum(_nll_bits(model, prefix + tokenizer(t, add_special_tokens=False).input_ids)
                for t in picks)  # fmt: skip
    expected = total / sum(map(len, picks))
    got = bits_per_char(model, tokenizer, picks, max_batch_tokens=max_batch_tokens)
    assert got == pytest.approx(expected, rel=REL)


def test_a_long_text_is_read_in_windows_of_the_models_context(tokenizer, model):
    texts = ["".join(TEXTS) * 6, TEXTS[2]]  # the first well over the tiny model's 64 positions
    seqs = [document_boundary(tokenizer) + tokenizer(t, add_special_tokens=False).input_ids
            for t in texts]  # fmt: skip
    assert len(seqs[0]) > 3 * 64 and len(seqs[1]) < 64
    for max_length, stride in ((None, None), (64, 16), (40, 39), (2, 1)):
        context, step = max_length or 64, stride or 32
        windows = [(seq, w) for seq in seqs for w in context_windows(len(seq), context, step)]
        bits = sum(_nll_bits(model, seq[s:e], f - s) for seq, (s, e, f) in windows)
        got = bits_per_char(model, tokenizer, texts, max_length=max_length, stride=stride,
                            max_batch_tokens=256)  # fmt: skip
        assert got == pytest.approx(bits / sum(map(len, texts)), rel=REL), (max_length, stride)


def test_texts_that_fit_do_not_depend_on_the_context(tokenizer, model):
    whole = bits_per_char(model, tokenizer, TEXTS, max_length=10_000)
    assert bits_per_char(model, tokenizer, TEXTS) == whole  # all fit in 64: read whole


def test_windowing_scores_each_token_once_exactly(tokenizer):
    bigram = _Bigram(len(tokenizer))
    text = "".join(TEXTS) * 3
    seq = document_boundary(tokenizer) + tokenizer(text, add_special_tokens=False).input_ids
    whole = _nll_bits(bigram, seq) / len(text)
    for max_length, stride in ((None, None), (8, 7), (5, 1), (2, 1), (50, 10)):
        got = bits_per_char(bigram, tokenizer, [text], max_length=max_length, stride=stride)
        assert got == pytest.approx(whole, rel=REL), (max_length, stride)


def test_bad_context_arguments(tokenizer, model):
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        bits_per_char(model, tokenizer, TEXTS, max_length=1)
    with pytest.raises(ValueError, match="stride must be < max_length"):
        bits_per_char(model, tokenizer, TEXTS, max_length=8, stride=8)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        bits_per_char(model, tokenizer, TEXTS, stride=0)
    with pytest.raises(TypeError, match="max_length must be an int"):
        bits_per_char(model, tokenizer, TEXTS, max_length=8.0)

    class _NoConfig(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, len(tokenizer)))

    with pytest.raises(ValueError, match="stride needs a context"):
        bits_per_char(_NoConfig(), tokenizer, TEXTS, stride=4)
    # no config and no max_length: texts are read whole; a uniform model gives log2(V) per token
    n = sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in TEXTS)
    got = bits_per_char(_NoConfig(), tokenizer, TEXTS)
    assert got == pytest.approx(n * math.log2(len(tokenizer)) / sum(map(len, TEXTS)))
