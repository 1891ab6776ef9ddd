"""PEFT-format adapters: ours load in PEFT with the same logits, PEFT's load in ours, bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from llamazh.testing import assert_close
from llamazh.training import load_adapter, prepare_for_training, save_adapter

MODES = [("full", "full"), ("new_rows", "new_rows"), ("frozen", "frozen"), ("new_rows", "full")]


def _peft_from_pretrained(base, path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(path))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("embeddings", "lm_head"), MODES)
def test_peft_reproduces_our_logits(
    tmp_path, make_model, perturb, new_ids, input_ids, tied, embeddings, lm_head
):
    model = make_model(tied=tied)
    if tied and embeddings != lm_head:  # one matrix cannot train two ways
        with pytest.raises(ValueError, match="cannot differ"):
            prepare_for_training(model, embeddings=embeddings, lm_head=lm_head)
        return
    prepared = prepare_for_training(
        model, rank=4, alpha=8, embeddings=embeddings, lm_head=lm_head, new_token_ids=new_ids
    )
    perturb(prepared)
    ours = model(input_ids).logits
    assert not torch.allclose(ours, make_model(tied=tied)(input_ids).logits)
    save_adapter(prepared, tmp_path / "adapter")
    theirs = _peft_from_pretrained(make_model(tied=tied), tmp_path / "adapter")(input_ids).logits
    assert_close(theirs, ours.double(), name="PEFT logits")
    reloaded = load_adapter(make_model(tied=tied), tmp_path / "adapter").model(input_ids).logits
    assert torch.equal(reloaded, ours)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["modules_to_save", "trainable_token_indices"])
def test_we_load_adapters_peft_wrote(
    tmp_path, make_model, make_peft, new_ids, input_ids, tied, kind
):
    from peft import LoraConfig

    extra = (
        {"modules_to_save": ["embed_tokens", "lm_head"]}
        if kind == "modules_to_save"
        else {
            "trainable_token_indices": new_ids
            if tied
            else {"embed_tokens": new_ids, "lm_head": new_ids}
        }
    )
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **extra)
    peft_model = make_peft(make_model(tied=tied), cfg)
    with torch.no_grad():
        if tied and kind == "modules_to_save":  # PEFT trains two copies; we keep one matrix
            inner = peft_model.base_model.model
            head_copy = inner.lm_head.modules_to_save.default.weight
            embed_copy = inner.model.embed_tokens.modules_to_save.default.weight
            peft_model.save_pretrained(str(tmp_path / "differ"))
            with pytest.raises(ValueError, match="tie_word_embeddings=False"):
                load_adapter(make_model(tied=tied), tmp_path / "differ")
            head_copy.copy_(embed_copy)
    peft_model.eval()
    theirs = peft_model(input_ids).logits
    peft_model.save_pretrained(str(tmp_path / "peft"))
    prepared = load_adapter(make_model(tied=tied), tmp_path / "peft")
    assert prepared.config.embeddings == ("full" if kind == "modules_to_save" else "new_rows")
    assert_close(prepared.model(input_ids).logits, theirs.double(), name="our logits")


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path, make_model):
    prepared = prepare_for_training(make_model(), rank=2, alpha=4)
    save_adapter(prepared, tmp_path / "a")
    frozen = load_adapter(make_model(), tmp_path / "a")
    assert frozen.report().trainable == 0
    resumed = load_adapter(make_model(), tmp_path / "a", trainable=True)
    assert resumed.report().by_kind == prepared.report().by_kind


def test_config_is_peft_readable(tmp_path, make_model, new_ids):
    from peft import LoraConfig

    prepared = prepare_for_training(
        make_model(), embeddings="new_rows", lm_head="full", new_token_ids=new_ids
    )
    save_adapter(prepared, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg = LoraConfig.from_pretrained(str(tmp_path / "a"))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (64, 128.0, 0.05)
    assert raw["modules_to_save"] == ["lm_head"]
    assert raw["trainable_token_indices"] == {"embed_tokens": new_ids}


def test_save_refuses_to_overwrite(tmp_path, make_model):
    prepared = prepare_for_training(make_model(), rank=2, alpha=4)
    (tmp_path / "a").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(prepared, tmp_path / "a")
    assert not any((tmp_path / "a").iterdir())
    save_adapter(prepared, tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="not prepared"):
        save_adapter(make_model(), tmp_path / "b")


def test_pickled_adapter_refused_unless_allowed(tmp_path, make_model, input_ids):
    from safetensors.torch import load_file

    prepared = prepare_for_training(
        make_model(), rank=2, alpha=4, embeddings="frozen", lm_head="frozen"
    )
    save_adapter(prepared, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "a" / "adapter_model.bin")
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_adapter(model, tmp_path / "a")
    assert model.state_dict().keys() == before.keys()  # left unchanged
    loaded = load_adapter(model, tmp_path / "a", allow_pickle=True)
    assert torch.equal(loaded.model(input_ids).logits, prepared.model(input_ids).logits)


def test_vocabulary_mismatch_is_a_clear_error(tmp_path, make_model, new_ids):
    prepared = prepare_for_training(make_model(), rank=2, alpha=4)
    save_adapter(prepared, tmp_path / "full")
    model = make_model(vocab_size=200)
    with pytest.raises(ValueError, match="vocabulary 256 but the model has 200"):
        load_adapter(model, tmp_path / "full")
    assert not any("lora" in k for k in model.state_dict())
    rows = prepare_for_training(
        make_model(),
        rank=2,
        alpha=4,
        embeddings="new_rows",
        lm_head="new_rows",
        new_token_ids=new_ids,
    )
    save_adapter(rows, tmp_path / "rows")
    with pytest.raises(ValueError, match="vocabulary 256 but the model has 200"):
        load_adapter(make_model(vocab_size=200), tmp_path / "rows")


def test_adapter_and_model_disagree(tmp_path, make_model):
    prepared = prepare_for_training(
        make_model(), rank=2, alpha=4, embeddings="frozen", lm_head="frozen"
    )
    save_adapter(prepared, tmp_path / "a")
    other = make_model(intermediate_size=96)
    with pytest.raises(ValueError, match="wrong shape"):
        load_adapter(other, tmp_path / "a")
    assert not any("lora" in k for k in other.state_dict())
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora=True"):
        load_adapter(make_model(), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter(make_model(), tmp_path)
