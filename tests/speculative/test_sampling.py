"""llamazh.sampling against transformers' logits processors of the same name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.sampling import SamplingConfig, block_presence, token_presence


@given(
    v=st.integers(2, 50),
    seed=st.integers(0, 2**16),
    temperature=st.floats(0.2, 3.0),
    top_k=st.one_of(st.none(), st.integers(1, 60)),
    top_p=st.one_of(st.none(), st.floats(0.05, 1.0)),
    penalty=st.one_of(st.none(), st.floats(0.5, 2.0)),
)
def test_matches_transformers_processors(v, seed, temperature, top_k, top_p, penalty):
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, v, generator=gen) * 3
    context = torch.randint(0, v, (3, 6), generator=gen)
    want = logits.clone()
    if penalty is not None:
        want = RepetitionPenaltyLogitsProcessor(penalty)(context, want)
    want = TemperatureLogitsWarper(temperature)(context, want)
    if top_k is not None:
        want = TopKLogitsWarper(top_k)(context, want)
    if top_p is not None and top_p < 1.0:
        want = TopPLogitsWarper(top_p)(context, want)
    cfg = SamplingConfig(True, temperature, top_k, top_p, penalty)
    got = cfg.process(logits, token_presence(context, v))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_block_presence_is_the_presence_of_each_prefix():
    context = torch.tensor([[1, 1, 4]])
    nxt = torch.tensor([[2, 4, 0]])
    block = block_presence(context, nxt, 6)  # (1, 4, 6)
    for j in range(4):
        want = token_presence(torch.cat([context, nxt[:, :j]], 1), 6)
        assert torch.equal(block[:, j], want)


def test_greedy_ignores_warps_and_sampling_is_seeded():
    cfg = SamplingConfig(do_sample=False, temperature=0.1, top_k=1)
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    assert cfg.choose(logits, None, None)[0].tolist() == [1]
    s = SamplingConfig(do_sample=True)
    a = s.choose(logits.expand(50, 3), None, torch.Generator().manual_seed(3))[0]
    b = s.choose(logits.expand(50, 3), None, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"top_p": 0.0}, "top_p must be > 0"),
        ({"top_p": 1.01}, "top_p must be in"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)
    with pytest.raises(TypeError, match="do_sample"):
        SamplingConfig(do_sample=1)
