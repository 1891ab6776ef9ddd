"""Data helpers: blocks, packing, collator label handling, packed loss == separate loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.testing import assert_close
from llamazh.training import CausalLMCollator, causal_lm_loss, group_into_blocks, pack_sequences


def test_group_into_blocks_appends_eos_and_drops_the_tail():
    blocks = group_into_blocks([[5, 6, 7], [8, 9]], 2, eos_token_id=2)
    assert blocks.tolist() == [[5, 6], [7, 2], [8, 9]]
    assert blocks.dtype == torch.int64
    assert group_into_blocks([[1, 2, 3]], 2).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="drop_last=False"):
        group_into_blocks([[1, 2, 3]], 2, drop_last=False)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        group_into_blocks([[1]], 0)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(40, 97))
def test_pack_sequences_is_a_partition_within_capacity(lengths, capacity):
    rows = pack_sequences(lengths, capacity)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
    assert all(r == sorted(r) for r in rows)
    lower = -(-sum(lengths) // capacity)
    assert len(rows) <= max(lower * 2, 1)  # first-fit decreasing is never worse than 2x optimal


def test_pack_sequences_refuses_to_truncate():
    with pytest.raises(ValueError, match=r"lengths\[1\]=9 must be in \[1, max_tokens=8\]"):
        pack_sequences([3, 9], 8)


def test_padded_collator_masks_padding_and_keeps_prompt_masks():
    batch = CausalLMCollator(pad_token_id=0)(
        [[5, 6, 7], {"input_ids": [8, 9], "labels": [-100, 9]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, 9, -100]]
    assert CausalLMCollator(pad_to_multiple_of=8)([[1, 2, 3]])["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="labels has length 1 but input_ids has 2"):
        CausalLMCollator()([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="no tokens"):
        CausalLMCollator()([[]])


def test_packed_collator_layout():
    batch = CausalLMCollator(pack=True)([[5, 6, 7], [8, 9]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert (
        batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["cu_seq_lens_q"].dtype == torch.int32
    )
    assert batch["max_length_q"] == 3
    assert batch["use_cache"] is False


def test_label_shift_matches_the_model_loss(make_model, input_ids):
    model = make_model()
    batch = CausalLMCollator(pad_token_id=0)([input_ids[0].tolist(), input_ids[1, :6].tolist()])
    out = model(**batch)
    ours = causal_lm_loss(out.logits, batch["labels"])
    assert_close(ours, out.loss.double(), name="loss")
    manual = torch.nn.functional.cross_entropy(
        out.logits[0, :-1], input_ids[0, 1:], reduction="sum"
    )
    manual = manual + torch.nn.functional.cross_entropy(
        out.logits[1, :5], input_ids[1, 1:6], reduction="sum"
    )
    assert_close(ours, (manual / (10 + 5)).double(), name="manual loss")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_separate_loss(make_model, attn):
    model = make_model(attn_implementation=attn)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (7, 13, 3, 11)]
    packed = CausalLMCollator(pack=True)(seqs)
    logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
    loss_sum = causal_lm_loss(logits, packed["labels"], reduction="sum")
    sep_sum = torch.zeros((), dtype=torch.float64)
    sep32 = torch.zeros(())
    for s in seqs:
        ids = torch.tensor([s])
        sep32 = sep32 + causal_lm_loss(model(ids).logits, ids, reduction="sum")
        sep_sum = sep_sum + causal_lm_loss(model.double()(ids).logits, ids, reduction="sum")
        model.float()
    assert_close(loss_sum, sep_sum, sep32, name="packed loss")
    # and the model's own loss with the packed batch passed as is
    out = model(**packed)
    n_pred = sum(len(s) - 1 for s in seqs)
    assert_close(out.loss, sep_sum / n_pred, sep32 / n_pred, name="model loss, packed")
