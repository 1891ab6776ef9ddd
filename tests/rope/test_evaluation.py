"""Long-context evaluation primitives on models whose answers are known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from llamazh.evaluation import passkey_retrieval_accuracy, perplexity_by_length
from llamazh.testing import tiny_llama


class _Uniform(torch.nn.Module):
    """Every next token equally likely: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.calls: list[int] = []

    def forward(self, input_ids):
        self.calls.append(input_ids.shape[1])
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class _Peek(torch.nn.Module):
    """Cheats by reading the next input token: retrieves every passkey. ``wrong=True`` never."""

    def __init__(self, vocab: int, wrong: bool = False) -> None:
        super().__init__()
        self.vocab, self.wrong = vocab, wrong

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            nxt = (nxt + 1) % self.vocab
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


def _encode(text: str) -> list[int]:
    return [ord(c) % 97 + 3 for c in text]  # a character tokenizer over 100 ids


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    model = _Uniform(50)
    ids = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0))
    ppl = perplexity_by_length(model, ids, [16, 100, 400], max_windows=3)
    assert list(ppl) == [16, 100, 400]
    # fp32 log-softmax of 50 equal logits: log(50) to ~1 ulp
    assert all(v == pytest.approx(50.0, rel=1e-5) for v in ppl.values())
    assert model.calls == [16] * 2 + [100] * 2 + [400] * 2  # only 2 blocks of 400 fit


def test_windows_of_every_length_end_at_the_same_tokens():
    seen: list[torch.Tensor] = []

    class Recorder(_Uniform):
        def forward(self, input_ids):
            seen.append(input_ids[0].clone())
            return super().forward(input_ids)

    stream = torch.arange(1000) % 50
    perplexity_by_length(Recorder(50), stream, [10, 30, 300], max_windows=2, score_last=8)
    assert [w.numel() for w in seen] == [10, 10, 30, 30, 300, 300]
    for window, end in zip(seen, [300, 600] * 3):  # blocks of 300 tokens: ends at 300 and 600
        assert torch.equal(window, stream[end - window.numel() : end])


def test_perplexity_matches_the_model_loss():
    model = tiny_llama()
    ids = torch.randint(3, 256, (64,), generator=torch.Generator().manual_seed(1))
    ppl = perplexity_by_length(model, ids, [64], max_windows=1)[64]
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)
    last = perplexity_by_length(model, ids, [64], score_last=10)[64]
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, -11:-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[-10:])
    assert last == pytest.approx(math.exp(float(expected)), rel=1e-5)


def test_perplexity_checks_arguments():
    model = _Uniform(10)
    with pytest.raises(ValueError, match="length 20 is longer than the token stream"):
        perplexity_by_length(model, list(range(10)), [20])
    with pytest.raises(ValueError, match="lengths must be a non-empty sequence"):
        perplexity_by_length(model, list(range(10)), [])
    with pytest.raises(ValueError, match="score_last must be in"):
        perplexity_by_length(model, list(range(10)), [5], score_last=5)


def test_passkey_accuracy_on_oracles():
    assert passkey_retrieval_accuracy(_Peek(100), _encode, [400, 900], trials=4) == {
        400: 1.0,
        900: 1.0,
    }
    assert passkey_retrieval_accuracy(_Peek(100, wrong=True), _encode, [400], trials=3) == {
        400: 0.0
    }


def test_passkey_prompt_has_the_requested_length():
    lengths = []

    class Recorder(_Uniform):
        def forward(self, input_ids):
            lengths.append(input_ids.shape[1])
            return super().forward(input_ids)

    passkey_retrieval_accuracy(Recorder(100), _encode, [500], trials=2, bos_id=1)
    from llamazh.evaluation import _FILLER

    filler = len(_encode(_FILLER))
    assert all(500 - filler < n <= 500 for n in lengths)
    with pytest.raises(ValueError, match="too short"):
        passkey_retrieval_accuracy(Recorder(100), _encode, [50])
