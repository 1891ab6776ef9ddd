"""speculative_generate: exactness against the target's own decoding, statistics, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.speculative import PromptLookupDrafter, speculative_generate
from llamazh.testing import tiny_llama


def _prompt(seed, length, vocab=256):
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@given(
    target_seed=st.integers(0, 1000),
    draft_seed=st.integers(0, 1000),
    prompt_len=st.integers(1, 12),
    max_new=st.integers(1, 40),
    k=st.integers(1, 6),
    schedule=st.sampled_from(["auto", "adaptive", "constant", "throughput"]),
)
def test_greedy_equals_target_generate(
    hf_greedy, target_seed, draft_seed, prompt_len, max_new, k, schedule
):
    target = tiny_llama(target_seed)
    draft = tiny_llama(draft_seed, num_hidden_layers=1)
    ids = _prompt(target_seed + draft_seed, prompt_len)
    eos = [2, 7]
    want = hf_greedy(target, ids, max_new, eos_token_id=eos)
    out = speculative_generate(
        target,
        draft,
        ids,
        max_new_tokens=max_new,
        num_draft_tokens=k,
        schedule=schedule,
        eos_token_id=eos,
    )
    assert out.sequences.tolist() == want.tolist()
    assert out.steps == len(out.draft_lengths) and out.accepted == sum(out.accepted_lengths)


def test_greedy_with_prompt_lookup_and_repetition_penalty(hf_greedy):
    target = tiny_llama(3)
    ids = torch.tensor([[5, 9, 11, 5, 9, 11, 5, 9]])
    for penalty in (None, 1.3):
        kwargs = {} if penalty is None else {"repetition_penalty": penalty}
        want = hf_greedy(target, ids, 30, **kwargs)
        out = speculative_generate(target, PromptLookupDrafter(), ids, max_new_tokens=30, **kwargs)
        assert out.sequences.tolist() == want.tolist()


def test_identical_draft_accepts_everything():
    target = tiny_llama(0)
    out = speculative_generate(
        target,
        tiny_llama(0),
        _prompt(0, 5),
        max_new_tokens=40,
        num_draft_tokens=3,
        schedule="constant",
    )
    assert out.acceptance_rate == 1.0
    assert out.accepted_lengths == out.draft_lengths
    assert out.num_new_tokens == 40 and out.steps == 10  # 3 drafts + 1 bonus per step


def test_trained_pair_greedy_is_exact_and_drafts_are_accepted(trained_pair, hf_greedy):
    target, draft, prompts = trained_pair
    rates = []
    for ids in prompts:
        want = hf_greedy(target, ids, 48)
        out = speculative_generate(target, draft, ids, max_new_tokens=48)
        assert out.sequences.tolist() == want.tolist()
        rates.append(out.acceptance_rate)
    # the pair learned the same bytes: far above chance (1/256)
    assert sum(rates) / len(rates) > 0.3, rates


def test_sampling_is_reproducible_and_respects_eos_and_length():
    target, draft = tiny_llama(0), tiny_llama(1)
    ids = _prompt(1, 4)
    runs = [
        speculative_generate(
            target,
            draft,
            ids,
            max_new_tokens=25,
            do_sample=True,
            temperature=0.7,
            top_k=40,
            top_p=0.9,
            generator=torch.Generator().manual_seed(7),
        ).sequences
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] == 4 + 25
    first = int(runs[0][0, 4 + 3])  # stop on the 4th generated token
    stopped = speculative_generate(
        target,
        draft,
        ids,
        max_new_tokens=25,
        do_sample=True,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        generator=torch.Generator().manual_seed(7),
        eos_token_id=[first],
    )
    generated = runs[0][0, 4:].tolist()
    assert stopped.new_tokens[0].tolist() == generated[: generated.index(first) + 1]


def test_sampled_loop_matches_target_distribution():
    """End to end on a 4-token vocabulary: the first 3 sampled tokens (joint, 64 cells) follow
    the target's own distribution with the same temperature (coarse: 1500 draws)."""
    v, temp = 4, 0.8
    target = tiny_llama(5, vocab_size=v, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    draft = tiny_llama(
        6,
        vocab_size=v,
        num_hidden_layers=1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    ids = torch.tensor([[1, 3, 0]])
    with torch.no_grad():
        grid = torch.cartesian_prod(*[torch.arange(v)] * 3)  # (64, 3)
        seqs = torch.cat([ids.expand(len(grid), -1), grid], 1)
        logp = (target(seqs).logits[:, 2:5].float() / temp).log_softmax(-1)  # (64, 3, v)
        expected = logp.gather(2, grid.unsqueeze(-1)).squeeze(-1).sum(1).exp().double()
    gen = torch.Generator().manual_seed(0)
    draws = 1500
    counts = torch.zeros(v**3, dtype=torch.float64)
    for _ in range(draws):
        out = speculative_generate(
            target,
            draft,
            ids,
            max_new_tokens=3,
            num_draft_tokens=2,
            do_sample=True,
            temperature=temp,
            generator=gen,
        )
        a, b, c = out.new_tokens[0].tolist()
        counts[a * v * v + b * v + c] += 1
    e = expected * draws
    stat = float(((counts - e) ** 2 / e).sum())
    dof = v**3 - 1
    z = 3.719  # 1 - 1e-4
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f}"


# ---- bad input ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    return tiny_llama(0), tiny_llama(1)


def test_different_vocabularies_are_refused(pair):
    target, _ = pair
    with pytest.raises(ValueError, match=r"vocabulary.*300.*256"):
        speculative_generate(target, tiny_llama(1, vocab_size=300), _prompt(0, 3), max_new_tokens=4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_draft_tokens": 0}, ValueError, "num_draft_tokens must be >= 1"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
        ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature must be > 0"),
        ({"do_sample": True, "temperature": -1.0}, ValueError, "temperature must be > 0"),
        ({"top_p": 1.5}, ValueError, "top_p must be in"),
        ({"schedule": "fast"}, ValueError, "schedule must be one of"),
        ({"eos_token_id": [2, "x"]}, ValueError, "eos_token_id"),
        ({"max_draft_tokens": 2, "num_draft_tokens": 4}, ValueError, "max_draft_tokens"),
    ],
)
def test_bad_arguments(pair, kwargs, error, match):
    target, draft = pair
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=match):
        speculative_generate(target, draft, _prompt(0, 3), **kwargs)


def test_bad_prompts(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="empty"):
        speculative_generate(target, draft, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(target, draft, _prompt(0, 3).repeat(2, 1), max_new_tokens=4)
    with pytest.raises(TypeError, match="int64"):
        speculative_generate(target, draft, [[1, 2, 3]], max_new_tokens=4)
    with pytest.raises(TypeError, match="draft must be"):
        speculative_generate(target, "draft", _prompt(0, 3), max_new_tokens=4)


def test_static_cache_follows_is_croppable(pair, hf_greedy):
    """A StaticCache cannot be rolled back up to transformers 5.23 (refused, named) and can from
    5.24 (then the output is the target's greedy output): decided by the cache's own
    ``is_croppable``, never by a version."""
    from transformers import StaticCache

    target, draft = pair
    cache = StaticCache(config=target.config, max_cache_len=32)
    prompt = _prompt(0, 3)
    if not cache.is_croppable:
        with pytest.raises(ValueError, match=r"StaticCache.*cannot be rolled back"):
            speculative_generate(target, draft, prompt, max_new_tokens=4, past_key_values=cache)
        return
    out = speculative_generate(target, draft, prompt, max_new_tokens=12, past_key_values=cache)
    assert torch.equal(out.sequences, hf_greedy(target, prompt, 12))


def test_uncroppable_cache_is_refused(pair):
    from transformers import DynamicCache

    class Frozen(DynamicCache):
        is_croppable = False  # e.g. quantized layers: positions cannot be dropped

    target, draft = pair
    cache = Frozen(config=target.config)
    with pytest.raises(ValueError, match=r"Frozen.*cannot be rolled back"):
        speculative_generate(target, draft, _prompt(0, 3), max_new_tokens=4, past_key_values=cache)


class _RepeatLast:
    """A custom drafter (protocol only): proposes the last token again, with probabilities of
    the wrong width when asked to."""

    def __init__(self, width=None):
        self.width = width

    def draft(self, input_ids, num_tokens, sampling, generator):
        from llamazh.speculative import Draft

        tokens = input_ids[:, -1:].expand(1, num_tokens)
        if self.width is None:
            return Draft(tokens, None)
        return Draft(tokens, torch.full((1, num_tokens, self.width), 1.0 / self.width))


def test_custom_drafters(pair, hf_greedy):
    target, _ = pair
    ids = _prompt(2, 5)
    out = speculative_generate(target, _RepeatLast(), ids, max_new_tokens=12)
    assert out.sequences.tolist() == hf_greedy(target, ids, 12).tolist()
    with pytest.raises(ValueError, match="another vocabulary"):
        speculative_generate(
            target,
            _RepeatLast(width=300),
            ids,
            max_new_tokens=12,
            do_sample=True,
            generator=torch.Generator().manual_seed(0),
        )
