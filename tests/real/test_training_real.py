"""The training path on SmolLM2 (tied embeddings): extend the vocabulary, LoRA plus the new rows
of the one shared matrix, a few optimizer steps, then save / load_adapter / PEFT / merge /
stock load, each giving the same logits and staying tied."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from llamazh.testing import assert_close
from llamazh.tokenizer import resize_embeddings
from llamazh.training import load_adapter, merge_adapters, prepare_for_training, save_adapter

pytestmark = pytest.mark.slow

NEW_WORDS = ["中文模型", "训练数据", "你好世界", "北京大学", "深度学习", "注意力机制"]
TEXTS = ["深度学习的中文模型需要训练数据。", "你好世界，北京大学的注意力机制课程。"]


def _tied(model) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    head, embed = getattr(head, "base_layer", head), getattr(embed, "base_layer", embed)
    return head.weight is embed.weight


@pytest.fixture(scope="module")
def extended_tokenizer(smollm2):
    _, tokenizer = smollm2
    new = copy.deepcopy(tokenizer)
    assert new.add_tokens(NEW_WORDS) == len(NEW_WORDS)
    return new


def _reordered(tokenizer):
    """A tokenizer whose first two ids are swapped: it does not extend the model's own."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    a, b = "!", '"'
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))


def _extend(model, tokenizer, new_tokenizer):
    new_ids = resize_embeddings(model, tokenizer, new_tokenizer)
    assert new_ids.tolist() == list(range(len(tokenizer), len(new_tokenizer)))
    return new_ids


def _batch(tokenizer, length: int = 24):
    batch = tokenizer(TEXTS, return_tensors="pt", padding="max_length", max_length=length)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch["input_ids"], batch["attention_mask"], labels


def test_resize_keeps_the_model_tied_and_its_rows(smollm2_copy, smollm2, extended_tokenizer):
    model, tokenizer = smollm2_copy
    before = smollm2[0].get_input_embeddings().weight
    new_ids = _extend(model, tokenizer, extended_tokenizer)
    weight = model.get_input_embeddings().weight
    assert weight.shape == (49152 + len(NEW_WORDS), 576) and _tied(model)
    assert torch.equal(weight[:49152], before) and model.config.vocab_size == weight.shape[0]
    assert torch.isfinite(weight[new_ids]).all()


def test_added_tokens_get_their_subword_mean(smollm2_copy, smollm2, extended_tokenizer):
    model, tokenizer = smollm2_copy
    before = smollm2[0].get_input_embeddings().weight
    new_ids = _extend(model, tokenizer, extended_tokenizer)
    weight = model.get_input_embeddings().weight
    for word, new_id in zip(NEW_WORDS, new_ids.tolist()):
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert torch.allclose(weight[new_id], before[pieces].mean(0), atol=1e-6), word


def test_a_tokenizer_that_does_not_extend_the_models_is_refused(smollm2_copy):
    model, tokenizer = smollm2_copy
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["中文"])
    with pytest.raises(ValueError, match="old_tokenizer has"):
        resize_embeddings(model, other, tokenizer)  # the model was not trained with `other`
    shuffled = copy.deepcopy(tokenizer)
    shuffled.add_tokens(["中文"])
    with pytest.raises(ValueError, match="must extend old_tokenizer"):
        resize_embeddings(model, tokenizer, _reordered(shuffled))


def test_train_save_load_merge_round_trip(smollm2_copy, extended_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from llamazh.pretrained import load_smollm2, smollm2_dir

    model, tokenizer = smollm2_copy
    new_ids = _extend(model, tokenizer, extended_tokenizer)
    prepared = prepare_for_training(
        model,
        rank=4,
        alpha=8,
        dropout=0.0,
        target_modules=("q_proj", "v_proj"),
        embeddings="new_rows",  # the tied lm_head follows
        new_token_ids=new_ids,
    )
    assert (prepared.config.embeddings, prepared.config.lm_head) == ("new_rows", "new_rows")
    assert prepared.tied and _tied(model)
    report = prepared.report()
    assert report.by_kind["embeddings"] == len(NEW_WORDS) * 576 and report.by_kind["lm_head"] == 0

    ids, mask, labels = _batch(extended_tokenizer)
    assert (ids >= 49152).any()  # the batch uses the new tokens
    optimizer = torch.optim.AdamW(prepared.param_groups(1e-3, embedding_lr=1e-2))
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0], losses
    emb = model.get_input_embeddings()
    assert emb.base_layer.weight.grad is None and emb.rows.grad is not None

    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        exact = copy.deepcopy(model).double()(input_ids=ids, attention_mask=mask).logits
    save_adapter(prepared, tmp_path / "adapter", tokenizer=extended_tokenizer)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == new_ids.tolist()

    def fresh_base():
        base, _ = load_smollm2()
        _extend(base, tokenizer, extended_tokenizer)
        return base

    with torch.no_grad():
        reloaded = load_adapter(fresh_base(), tmp_path / "adapter")
        assert reloaded.tied and _tied(reloaded.model)
        assert torch.equal(reloaded.model(input_ids=ids, attention_mask=mask).logits, ours)
        del reloaded

        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(fresh_base(), str(tmp_path / "adapter"))
        theirs = peft_model.eval()(input_ids=ids, attention_mask=mask).logits
        assert_close(theirs, exact, ours, name="PEFT logits")
        del peft_model

    merged_dir = merge_adapters(
        smollm2_dir(), tmp_path / "adapter", tmp_path / "merged", progress=False
    )
    merged_config = json.loads((merged_dir / "config.json").read_text())
    assert merged_config["tie_word_embeddings"] is True
    assert merged_config["vocab_size"] == 49152 + len(NEW_WORDS)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert _tied(merged)
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask).logits
    # merging rounds W + B @ A once in fp32: within twice the fp32 error of the unmerged model
    floor = (ours.double() - exact).abs().max().item()
    err = (got.double() - exact).abs().max().item()
    assert err <= 8 * floor + 1e-5, (err, floor)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(merged_dir))) == len(extended_tokenizer)


def test_llamazh_train_pt_and_sft_on_smollm2(smollm2, tmp_path, corpus_path):
    """The README's entry points on the real model: two steps each, adapters merge_adapters
    takes, the merged model loads with stock from_pretrained."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from llamazh.cli import main
    from llamazh.pretrained import smollm2_dir
    from llamazh.training.train import trainer_problem

    if trainer_problem():
        pytest.skip(trainer_problem())
    lines = Path(corpus_path("zh_d2l.txt")).read_text(encoding="utf-8").splitlines()[:40]
    (tmp_path / "zh.txt").write_text("\n".join(lines), encoding="utf-8")
    records = [{"instruction": line[:16], "output": line[16:48]} for line in lines[:8]]
    (tmp_path / "sft.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    common = ["--model", str(smollm2_dir()), "--max-steps", "2", "--rank", "4", "--alpha", "8"]
    assert main(["train", "pt", *common, "--data", str(tmp_path / "zh.txt"), "-o",
                 str(tmp_path / "pt"), "--block-size", "64"]) == 0  # fmt: skip
    assert main(["train", "sft", *common, "--data", str(tmp_path / "sft.json"), "-o",
                 str(tmp_path / "sft"), "--template", "chatml-smollm2", "--max-length", "96",
                 "--embeddings", "frozen"]) == 0  # fmt: skip
    merge_adapters(
        smollm2_dir(), [tmp_path / "pt", tmp_path / "sft"], tmp_path / "m", progress=False
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert _tied(merged)
