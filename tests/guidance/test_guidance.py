"""ClassifierFreeGuidance: transformers' guidance_scale semantics, rollback, speculative use."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.guidance import ClassifierFreeGuidance
from llamazh.speculative import speculative_generate
from llamazh.testing import assert_close, tiny_llama


def _ids(seed, length):
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, n, **kwargs):
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=[],
        pad_token_id=0,
        **kwargs,
    )


@given(
    seed=st.integers(0, 1000),
    scale=st.sampled_from([0.0, 0.5, 1.5, 3.0]),
    negative=st.booleans(),
)
def test_generate_with_processor_equals_transformers_guidance(seed, scale, negative):
    from transformers import LogitsProcessorList

    model = tiny_llama(seed % 5)
    ids = _ids(seed, 6)
    neg = _ids(seed + 1, 4) if negative else None
    want = _generate(model, ids, 20, guidance_scale=scale, negative_prompt_ids=neg)
    cfg = ClassifierFreeGuidance(scale, model, negative_prompt_ids=neg)
    got = _generate(model, ids, 20, logits_processor=LogitsProcessorList([cfg]))
    assert got.tolist() == want.tolist()


def test_scores_equal_transformers_processor_step_by_step():
    from transformers import UnbatchedClassifierFreeGuidanceLogitsProcessor

    model = tiny_llama(2)
    ids, neg = _ids(0, 5), _ids(1, 3)
    seq = torch.cat([ids, _ids(2, 6)], 1)
    ours = ClassifierFreeGuidance(1.7, model, negative_prompt_ids=neg)
    theirs = UnbatchedClassifierFreeGuidanceLogitsProcessor(1.7, model, unconditional_ids=neg)
    with torch.no_grad():
        logits = model.double()(seq).logits.float()  # any scores will do
        model.float()
        for t in range(5, seq.shape[1] + 1):
            scores = logits[:, t - 1]
            assert_close(ours(seq[:, :t], scores), theirs(seq[:, :t], scores), name=f"t={t}")


def test_rollback_equals_a_fresh_processor():
    model = tiny_llama(3)
    ids, neg = _ids(0, 4), _ids(1, 3)
    a = torch.cat([ids, _ids(5, 7)], 1)
    b = torch.cat([a[:, :7], _ids(6, 4)], 1)  # shares 3 generated tokens, then diverges
    scores = torch.randn(1, 256, generator=torch.Generator().manual_seed(0))
    used = ClassifierFreeGuidance(2.0, model, negative_prompt_ids=neg)
    with torch.no_grad():
        used(ids, scores)
        used.prefetch(a)  # e.g. drafted positions, later rejected
        used(a, scores)
        for t in range(7, b.shape[1] + 1):
            fresh = ClassifierFreeGuidance(2.0, model, negative_prompt_ids=neg)
            fresh(ids, scores)
            assert_close(used(b[:, :t], scores), fresh(b[:, :t], scores), name=f"t={t}")
    # prefixes of the cached sequence are served without new forwards
    calls = used.forward_calls
    used(b[:, :9], scores)
    assert used.forward_calls == calls


def test_speculative_greedy_with_guidance_equals_transformers():
    target, draft = tiny_llama(0), tiny_llama(1, num_hidden_layers=1)
    ids, neg = _ids(3, 6), _ids(4, 3)
    want = _generate(target, ids, 24, guidance_scale=1.5, negative_prompt_ids=neg)
    cfg = ClassifierFreeGuidance(1.5, target, negative_prompt_ids=neg)
    out = speculative_generate(
        target, target, ids, max_new_tokens=24, logits_processor=[cfg]
    )  # guided target, unguided identical draft: rejections do happen
    assert out.sequences.tolist() == want.tolist()
    assert out.accepted < out.drafted
    # one unconditional forward per verification step (prefetch), plus the negative prompt
    assert cfg.forward_calls <= out.steps + 1
    cfg2 = ClassifierFreeGuidance(1.5, target, negative_prompt_ids=neg)
    out2 = speculative_generate(target, draft, ids, max_new_tokens=24, logits_processor=[cfg2])
    assert out2.sequences.tolist() == want.tolist()


def test_bad_input():
    model = tiny_llama(0)
    with pytest.raises(TypeError, match="guidance_scale must be a number"):
        ClassifierFreeGuidance("2", model)
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        ClassifierFreeGuidance(float("nan"), model)
    with pytest.raises(ValueError, match="negative_prompt_ids must be"):
        ClassifierFreeGuidance(2.0, model, negative_prompt_ids=torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        ClassifierFreeGuidance(
            2.0,
            model,
            negative_prompt_ids=torch.ones(1, 3, dtype=torch.long),
            negative_prompt_attention_mask=torch.ones(1, 2, dtype=torch.long),
        )
    cfg = ClassifierFreeGuidance(2.0, model)
    scores = torch.zeros(1, 256)
    cfg(_ids(0, 4), scores)
    with pytest.raises(ValueError, match="do not start with the prompt"):
        cfg(_ids(1, 5), scores)
    cfg.reset()
    cfg(_ids(1, 5), scores)


def test_a_failed_first_forward_leaves_the_processor_unstarted():
    """A model error during the first call must not leave half a state behind: the next call
    starts cleanly, and the internal forward refuses to run before the prompt is known."""
    model = tiny_llama(0)
    cfg = ClassifierFreeGuidance(2.0, model)
    with pytest.raises(RuntimeError, match="before the processor saw its prompt"):
        cfg._run(_ids(0, 2))
    bad = ClassifierFreeGuidance(2.0, model, negative_prompt_ids=torch.tensor([[999]]))
    with pytest.raises(IndexError):  # id 999 is outside the 256-token embedding
        bad(_ids(0, 4), torch.zeros(1, 256))
    assert bad._prompt is None
    bad.negative_prompt_ids = torch.tensor([[5]])
    fresh = ClassifierFreeGuidance(2.0, model, negative_prompt_ids=torch.tensor([[5]]))
    assert_close(bad(_ids(0, 4), torch.zeros(1, 256)), fresh(_ids(0, 4), torch.zeros(1, 256)))
