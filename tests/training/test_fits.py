"""An adapter goes only where it fits: PEFT's tied adapters follow the tie (as PEFT's own
merge_and_unload does), vocabulary and tie mismatches are refused, loading returns eval mode;
a prepared model's save_pretrained writes its adapter; a PEFT model is refused."""

from __future__ import annotations

import pytest

from llamazh.testing import assert_close
from llamazh.training import load_adapter, merge_adapters, prepare_for_training, save_adapter


@pytest.mark.parametrize("form", ["dict", "list"])
def test_peft_tied_token_adapter_merges_like_merge_and_unload(
    tmp_path, make_model, make_peft, new_ids, input_ids, form
):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    indices = {"embed_tokens": new_ids} if form == "dict" else new_ids
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=indices
    )
    peft_model = make_peft(make_model(tied=True), cfg)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    theirs = peft_model.merge_and_unload()(input_ids).logits

    loaded = load_adapter(make_model(tied=True), tmp_path / "adapter")
    assert (loaded.config.embeddings, loaded.config.lm_head) == ("new_rows", "new_rows")
    assert_close(loaded.model(input_ids).logits, theirs.double(), name="load_adapter")

    make_model(tied=True).save_pretrained(tmp_path / "base")
    merge_adapters(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert_close(merged(input_ids).logits, theirs.double(), name="merge_adapters")


def test_vocabulary_mismatch_refused(tmp_path, make_model):
    ids = list(range(256, 300))
    prepared = prepare_for_training(
        make_model(vocab_size=300), rank=2, alpha=4, embeddings="new_rows", new_token_ids=ids
    )
    save_adapter(prepared, tmp_path / "a")
    with pytest.raises(ValueError, match="vocabulary 300 but the model has 301"):
        load_adapter(make_model(vocab_size=301), tmp_path / "a")
    make_model(vocab_size=301).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="vocabulary 300 but the model has 301"):
        merge_adapters(tmp_path / "base", tmp_path / "a", tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_tie_mismatch_refused(tmp_path, make_model, new_ids, perturb):
    untied = prepare_for_training(
        make_model(tied=False), rank=2, alpha=4, embeddings="new_rows", new_token_ids=new_ids
    )
    perturb(untied)
    save_adapter(untied, tmp_path / "untied")
    model = make_model(tied=True)
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        load_adapter(model, tmp_path / "untied")
    assert not any("lora" in k for k in model.state_dict())  # left unchanged
    tied = prepare_for_training(
        make_model(tied=True), rank=2, alpha=4, embeddings="new_rows", new_token_ids=new_ids
    )
    save_adapter(tied, tmp_path / "tied")
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        load_adapter(make_model(tied=False), tmp_path / "tied")


def test_untied_rows_without_metadata_are_not_dropped(tmp_path, make_model, new_ids, perturb):
    """A PEFT-written untied adapter (no llamazh metadata) with its own lm_head rows."""
    from safetensors.torch import load_file, save_file

    untied = prepare_for_training(
        make_model(tied=False), rank=2, alpha=4, embeddings="new_rows", new_token_ids=new_ids
    )
    save_adapter(untied, tmp_path / "mixed")  # new rows in, a full lm_head out
    weights = tmp_path / "mixed" / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # drop the metadata
    with pytest.raises(ValueError, match=r"two matrices.*tie_word_embeddings=False"):
        load_adapter(make_model(tied=True), tmp_path / "mixed")
    untied = prepare_for_training(
        make_model(tied=False),
        rank=2,
        alpha=4,
        lm_head="new_rows",
        embeddings="new_rows",
        new_token_ids=new_ids,
    )
    perturb(untied)
    save_adapter(untied, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # drop the metadata
    with pytest.raises(ValueError, match="trains lm_head rows of its own"):
        load_adapter(make_model(tied=True), tmp_path / "a")


def test_loaded_model_is_in_eval_mode(tmp_path, make_model):
    prepared = prepare_for_training(make_model().train(), rank=2, alpha=4)
    save_adapter(prepared, tmp_path / "a")
    assert not load_adapter(make_model().train(), tmp_path / "a").model.training
    assert load_adapter(make_model().train(), tmp_path / "a", trainable=True).model.training


def test_plain_save_pretrained_writes_the_adapter(tmp_path, make_model, new_ids, perturb):
    model = make_model(tied=True)
    prepared = prepare_for_training(
        model, rank=2, alpha=4, embeddings="new_rows", new_token_ids=new_ids
    )
    perturb(prepared)
    model.save_pretrained(tmp_path / "a")  # crashed on the shared rows before
    merge_base = tmp_path / "base"
    make_model(tied=True).save_pretrained(merge_base)
    merge_adapters(merge_base, tmp_path / "a", tmp_path / "merged", progress=False)
    prepared.undo()
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "whole")  # the stock method again
    assert (tmp_path / "whole" / "model.safetensors").is_file()


def test_peft_model_is_refused_with_the_way_out(make_model, make_peft):
    from peft import LoraConfig

    peft_model = make_peft(make_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"already a PEFT model.*get_base_model"):
        prepare_for_training(peft_model)


def test_empty_state_dict_names_the_zero3_fix(tmp_path, make_model):
    prepared = prepare_for_training(make_model(), rank=2, alpha=4)
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        prepared.model.save_pretrained(tmp_path / "a", state_dict={})
    assert not (tmp_path / "a").exists()
