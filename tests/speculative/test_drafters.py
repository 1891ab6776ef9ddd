"""Drafters and cache rollback: cropping a cache equals recomputing from scratch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.integrations.hf_cache import (
    cache_kwargs,
    cache_length,
    crop_cache,
    new_dynamic_cache,
)
from llamazh.sampling import SamplingConfig
from llamazh.speculative import ModelDrafter, PromptLookupDrafter, common_prefix_length
from llamazh.testing import assert_close, tiny_llama

GREEDY = SamplingConfig()


@given(
    prefix=st.integers(1, 20),
    wrong=st.integers(1, 8),
    right=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_rollback_gives_the_logits_of_a_fresh_computation(prefix, wrong, right, seed):
    model = tiny_llama(seed % 7)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, prefix + right), generator=gen)
    rejected = torch.randint(0, 256, (1, wrong), generator=gen)
    with torch.no_grad():
        cache = new_dynamic_cache(model)
        model(ids[:, :prefix], **cache_kwargs(model, cache))
        model(rejected, **cache_kwargs(model, cache))  # drafts that get rejected
        crop_cache(cache, prefix)
        assert cache_length(cache) == prefix
        rolled = model(ids[:, prefix:], **cache_kwargs(model, cache)).logits
        fresh = model(ids).logits[:, prefix:]
        reference = model.double()(ids).logits[:, prefix:]
    assert_close(rolled, reference, fresh, name="logits after rollback")


def test_crop_cache_refuses_to_grow():
    model = tiny_llama(0)
    cache = new_dynamic_cache(model)
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]), **cache_kwargs(model, cache))
    with pytest.raises(ValueError, match="length=5"):
        crop_cache(cache, 5)
    crop_cache(cache, 3)  # no-op, never crop(0)
    assert cache_length(cache) == 3


def test_model_drafter_reconciles_its_cache_with_the_sequence():
    """After drafts are rejected, a reused drafter drafts what a fresh one drafts."""
    model = tiny_llama(1)
    drafter = ModelDrafter(model)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    first = drafter.draft(ids, 5, GREEDY, None)
    assert first.tokens.shape == (1, 5) and first.probs is None
    # the target accepted 2 drafts and then chose another token
    other = (first.tokens[0, 2] + 1) % 256
    seq = torch.cat([ids, first.tokens[:, :2], other.view(1, 1)], 1)
    calls = drafter.forward_calls
    again = drafter.draft(seq, 4, GREEDY, None)
    assert drafter.forward_calls - calls == 4  # one catch-up forward + 3, no re-encoding
    fresh = ModelDrafter(model).draft(seq, 4, GREEDY, None)
    assert again.tokens.tolist() == fresh.tokens.tolist()


def test_model_drafter_sampling_returns_its_distributions():
    drafter = ModelDrafter(tiny_llama(1))
    cfg = SamplingConfig(do_sample=True, temperature=0.5, top_k=3)
    out = drafter.draft(torch.tensor([[5, 6, 7]]), 3, cfg, torch.Generator().manual_seed(0))
    assert out.probs.shape == (1, 3, 256)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(1, 3))
    assert (out.probs > 0).sum(-1).le(3).all()  # top-k applied
    assert out.probs.gather(2, out.tokens.unsqueeze(-1)).gt(0).all()


def test_prompt_lookup_copies_the_latest_match_and_extends_periodically():
    drafter = PromptLookupDrafter(max_ngram_size=2)
    seq = torch.tensor([[7, 8, 1, 2, 9, 9, 1, 2, 5, 6, 1, 2]])
    # latest earlier "1 2" is at 6..7, followed by 5 6 1 2; then the copy repeats its period
    out = drafter.draft(seq, 7, GREEDY, None)
    assert out.tokens.tolist() == [[5, 6, 1, 2, 5, 6, 1]] and out.probs is None
    assert drafter.draft(torch.tensor([[1, 2, 3]]), 4, GREEDY, None).tokens.shape == (1, 0)
    assert drafter.draft(torch.tensor([[4]]), 4, GREEDY, None).tokens.shape == (1, 0)
    assert drafter.draft(torch.tensor([[4, 4]]), 3, GREEDY, None).tokens.tolist() == [[4, 4, 4]]


def test_prompt_lookup_arguments():
    with pytest.raises(ValueError, match="min_ngram_size must be <= max_ngram_size"):
        PromptLookupDrafter(max_ngram_size=1, min_ngram_size=2)
    with pytest.raises(ValueError, match="max_ngram_size must be >= 1"):
        PromptLookupDrafter(max_ngram_size=0)


def test_common_prefix_length():
    a = torch.tensor([1, 2, 3, 4])
    assert common_prefix_length(a, torch.tensor([1, 2, 9])) == 2
    assert common_prefix_length(a, a[:2]) == 2
    assert common_prefix_length(a, a[:0]) == 0
