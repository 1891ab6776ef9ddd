"""SuffixDrafter: what it proposes (longest match, votes, corpus, repeats, adaptive length),
and greedy speculative decoding with it == the target's own greedy decoding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamazh.sampling import SamplingConfig
from llamazh.speculative import SuffixDrafter, speculative_generate
from llamazh.testing import tiny_llama

GREEDY = SamplingConfig()


def _draft(drafter, ids, k=16):
    return drafter.draft(torch.tensor([ids]), k, GREEDY, None).tokens[0].tolist()


def test_copies_what_followed_the_longest_match():
    drafter = SuffixDrafter(min_confidence=0.1)
    # "9 4 5" occurs once; "4 5" also occurs followed by 8: the longest match (3) decides
    drafted = _draft(drafter, [9, 4, 5, 6, 7, 1, 4, 5, 8, 2, 9, 4, 5])
    assert drafted == [6, 7, 1, 4, 5, 8, 2, 9, 4, 5, 6, 7]  # alpha 4 x match 3 tokens
    assert _draft(drafter, [9, 4, 5, 6, 7, 1, 4, 5, 8, 2, 9, 4, 5], k=3) == [6, 7, 1]


def test_adaptive_length_min_match_and_confidence():
    seq = [3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2]
    assert len(_draft(SuffixDrafter(alpha=2.0, min_confidence=0.1), seq)) == 4  # 2 x match 2
    assert _draft(SuffixDrafter(min_match=3), seq) == []
    assert _draft(SuffixDrafter(), [1, 2, 3, 4]) == []  # nothing seen before
    # one occurrence of a 2-token match: confidence 2/3, then 2/3 * 3/4, ...: 2 / (2 + n)
    assert _draft(SuffixDrafter(min_confidence=0.4), seq) == [3, 4, 5]
    # votes: "0 1 2" followed by 3 twice and by 7 once -> 3 (2 / (3 + 1/3) = 0.6)
    voted = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 7, 0, 1, 2]
    assert _draft(SuffixDrafter(min_confidence=0.55), voted, k=1) == [3]
    assert _draft(SuffixDrafter(min_confidence=0.65), voted, k=1) == []


def test_repeating_pattern_runs_on_into_its_own_draft():
    drafter = SuffixDrafter(min_confidence=0.01, alpha=8.0)
    assert _draft(drafter, [7, 1, 2, 3, 1, 2, 3, 1, 2], k=8) == [3, 1, 2, 3, 1, 2, 3, 1]


def test_corpus_documents_are_searched_but_not_crossed():
    drafter = SuffixDrafter([[5, 6, 7, 8], [40, 41]], min_confidence=0.1)
    assert _draft(drafter, [1, 2, 5, 6]) == [7, 8]  # stops at the document's end
    drafter.add(torch.tensor([9, 9, 5, 6, 7, 30]))
    assert _draft(drafter, [1, 2, 5, 6], k=1) == [7]  # both documents vote for 7


def test_the_index_follows_a_sequence_that_is_not_an_extension():
    drafter = SuffixDrafter(min_confidence=0.1)
    assert _draft(drafter, [1, 2, 3, 9, 1, 2], k=2) == [3, 9]
    assert _draft(drafter, [1, 2, 4, 9, 1, 2], k=2) == [4, 9]  # rebuilt, not stale
    assert _draft(drafter, [1, 2, 4, 9, 1, 2, 4, 6, 1, 2], k=1) == [4]  # grown


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_match": 0}, "max_match"),
        ({"min_match": 5, "max_match": 3}, "min_match"),
        ({"alpha": 0.0}, "alpha"),
        ({"min_confidence": 1.5}, "min_confidence"),
        ({"corpus": [[1, -2]]}, "corpus"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SuffixDrafter(**kwargs)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 500),
    period=st.integers(2, 9),
    max_new=st.integers(1, 40),
    corpus=st.booleans(),
)
def test_greedy_equals_target_generate(hf_greedy, seed, period, max_new, corpus):
    target = tiny_llama(seed % 7)
    gen = torch.Generator().manual_seed(seed)
    unit = torch.randint(3, 256, (period,), generator=gen)
    ids = torch.cat([unit, unit, unit[: period // 2]]).unsqueeze(0)
    want = hf_greedy(target, ids, max_new, eos_token_id=[2, 7])
    documents = [want[0].tolist()] if corpus else None  # a corpus holding the very answer
    out = speculative_generate(
        target, SuffixDrafter(documents), ids, max_new_tokens=max_new, eos_token_id=[2, 7]
    )
    assert out.sequences.tolist() == want.tolist()
    if corpus and max_new > 8:
        assert out.accepted > 0


def test_a_batch_is_refused():
    with pytest.raises(ValueError, match="SuffixDrafter drafts one sequence"):
        SuffixDrafter().draft(torch.ones(2, 4, dtype=torch.long), 4, GREEDY, None)
