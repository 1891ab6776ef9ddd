"""Tied embeddings are first-class: one mode names both sides, one shared matrix trains, and
save / load_adapter / PEFT / merge / stock from_pretrained keep the model tied."""

from __future__ import annotations

import copy
import itertools
import json
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.testing import assert_close
from llamazh.training import (
    RowsEmbedding,
    RowsLinear,
    load_adapter,
    merge_adapters,
    prepare_for_training,
    save_adapter,
)
from llamazh.training.prepare import resolve_modes

MODES = (None, "frozen", "full", "new_rows")


def _is_tied(model) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    head, embed = getattr(head, "base_layer", head), getattr(embed, "base_layer", embed)
    return head.weight is embed.weight


@pytest.mark.parametrize(("embeddings", "lm_head"), list(itertools.product(MODES, MODES)))
def test_mode_resolution(embeddings, lm_head):
    # untied: each side on its own, None = "full"
    assert resolve_modes(embeddings, lm_head, tied=False) == (
        embeddings or "full",
        lm_head or "full",
    )
    # tied: the named side wins, two different named modes raise
    if embeddings and lm_head and embeddings != lm_head:
        with pytest.raises(ValueError, match="cannot differ"):
            resolve_modes(embeddings, lm_head, tied=True)
    else:
        mode = embeddings or lm_head or "full"
        assert resolve_modes(embeddings, lm_head, tied=True) == (mode, mode)


@pytest.mark.parametrize("side", ["embeddings", "lm_head"])
@pytest.mark.parametrize("mode", ["frozen", "full", "new_rows"])
def test_naming_one_side_sets_both(make_model, new_ids, side, mode):
    model = make_model(tied=True)
    prepared = prepare_for_training(model, rank=2, alpha=4, new_token_ids=new_ids, **{side: mode})
    assert (prepared.config.embeddings, prepared.config.lm_head) == (mode, mode)
    assert prepared.tied and _is_tied(model)
    kinds = prepared.report().by_kind
    assert kinds["lm_head"] == 0  # the one matrix is counted once, under embeddings
    expected = {"frozen": 0, "full": 256 * 64, "new_rows": len(new_ids) * 64}[mode]
    assert kinds["embeddings"] == expected


@given(
    ids=st.lists(st.integers(0, 255), min_size=1, max_size=40, unique=True),
    side=st.sampled_from(["embeddings", "lm_head"]),
)
def test_new_rows_of_the_shared_matrix(ids, side):
    """Property: with one shared rows parameter, the model computes with W' = W with rows
    ``ids`` replaced, on the input and the output side, and only those rows get gradients."""
    from llamazh.testing import tiny_llama

    model = tiny_llama(seed=0, vocab_size=256, tie_word_embeddings=True)
    prepared = prepare_for_training(model, rank=2, alpha=4, new_token_ids=ids, **{side: "new_rows"})
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, RowsEmbedding) and isinstance(head, RowsLinear)
    assert head.rows is emb.rows and head.base_layer.weight is emb.base_layer.weight
    with torch.no_grad():
        emb.rows.add_(torch.randn(emb.rows.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    dense = emb.merged_weight()
    assert_close(head(x), (x.double() @ dense.double().t()), x @ dense.t(), name="tied head")
    tokens = torch.tensor([[*ids[:5], 0]])
    assert torch.equal(emb(tokens), dense[tokens])
    batch = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    batch[0, 0] = ids[0]
    model(batch, labels=batch).loss.backward()
    assert emb.base_layer.weight.grad is None and emb.rows.grad.shape == (len(ids), 64)
    assert [g["name"] for g in prepared.param_groups(1e-3)] == ["lora", "embeddings"]
    assert sum(len(g["params"]) for g in prepared.param_groups(1e-3) if g["name"] != "lora") == 1


def _fold_in_memory(unmerged):
    """The merge baseline: LoRA and rows folded into the weights by plain fp32 PyTorch."""
    from llamazh.training import LoRALinear

    model = copy.deepcopy(unmerged)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.base_layer.weight += m.delta_weight()
                m.lora_B.weight.zero_()
            elif isinstance(m, RowsEmbedding):  # the tied head reads the same base weight
                m.base_layer.weight.index_copy_(0, m.token_ids, m.rows)
    return model


def _peft_load(base, path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(path)).eval()


@pytest.mark.parametrize(
    "named", [{"embeddings": "new_rows"}, {"lm_head": "new_rows"}, {"embeddings": "full"}]
)
def test_save_load_peft_merge_stay_tied(tmp_path, make_model, perturb, new_ids, input_ids, named):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    make_model(tied=True).save_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    prepared = prepare_for_training(model, rank=4, alpha=8, new_token_ids=new_ids, **named)
    perturb(prepared)
    ours = model(input_ids).logits
    exact = copy.deepcopy(model).double()(input_ids).logits
    save_adapter(prepared, tmp_path / "adapter")

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if "new_rows" in named.values():
        assert cfg["trainable_token_indices"] == new_ids  # a list: PEFT ties both sides
        assert cfg["modules_to_save"] is None
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lm_head.token_adapter" in k for k in keys)  # one copy of the rows

    reloaded = load_adapter(make_model(tied=True), tmp_path / "adapter")
    assert reloaded.tied and _is_tied(reloaded.model)
    if "new_rows" in named.values():
        emb, head = reloaded.model.get_input_embeddings(), reloaded.model.get_output_embeddings()
        assert head.rows is emb.rows
    assert torch.equal(reloaded.model(input_ids).logits, ours)

    peft_model = _peft_load(make_model(tied=True), tmp_path / "adapter")
    assert_close(peft_model(input_ids).logits, ours.double(), name="PEFT logits")

    merged_dir = merge_adapters(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert _is_tied(merged)
    baseline = _fold_in_memory(model)(input_ids).logits
    assert_close(merged(input_ids).logits, exact, baseline, name="merged logits")

    # and the merged directory takes a second round of training, still tied
    again = prepare_for_training(merged, rank=2, alpha=4, lm_head="new_rows", new_token_ids=[7])
    assert again.tied and _is_tied(merged)
