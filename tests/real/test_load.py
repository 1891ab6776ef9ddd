"""load_smollm2: the converted cache is a stock, tied Hugging Face directory."""

from __future__ import annotations

import json

import pytest
import torch

from llamazh.pretrained import SMOLLM2_SHA256, smollm2_dir


def test_loaded_model_is_smollm2_and_tied(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (30, 576, 9)
    assert (cfg.num_key_value_heads, cfg.vocab_size, cfg.tie_word_embeddings) == (3, 49152, True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.dtype == torch.float32 and not model.training
    assert len(tokenizer) == 49152 and tokenizer.pad_token_id == 2
    assert "<|im_start|>" in tokenizer.chat_template


def test_cache_records_the_source_and_loads_with_stock_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    directory = smollm2_dir()
    manifest = json.loads((directory / "llamazh_source.json").read_text())
    assert manifest["gguf_sha256"] == SMOLLM2_SHA256
    config = json.loads((directory / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    stock = AutoModelForCausalLM.from_pretrained(directory)
    assert stock.get_output_embeddings().weight is stock.get_input_embeddings().weight
    model, _ = smollm2
    assert torch.equal(stock.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_greedy_chat_answer(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is 2+2?"}]
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "4" in answer


def test_bfloat16_load(smollm2):
    from llamazh.pretrained import load_smollm2

    model, _ = load_smollm2(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        load_smollm2(dtype="float16")  # type: ignore[arg-type]
