"""transformers' Trainer on prepared models: checkpoints at save_steps are PEFT adapters that
stock PEFT and load_adapter load, and resume_from_checkpoint ends bit-identical."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from llamazh.testing import assert_close
from llamazh.training import load_adapter, prepare_for_training

pytestmark = pytest.mark.usefixtures("trainer_runs")

CASES = [(True, "new_rows"), (True, "full"), (False, "new_rows"), (False, "full")]


def _dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 256, (12,), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _train(make_model, new_ids, out, *, tied, mode, max_steps=4, resume=None):
    from transformers import Trainer, TrainingArguments

    prepared = prepare_for_training(
        make_model(tied=tied),
        rank=4,
        alpha=8,
        dropout=0.1,  # dropout on: resuming must restore the RNG too
        embeddings=mode,
        lm_head=mode,
        new_token_ids=new_ids,
    )
    args = TrainingArguments(
        str(out),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        seed=3,
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=prepared.model, args=args, train_dataset=_dataset()).train(
            resume_from_checkpoint=resume
        )
    return prepared


@pytest.mark.parametrize(("tied", "mode"), CASES)
def test_checkpoints_are_adapters_and_resume_is_exact(
    tmp_path, make_model, new_ids, input_ids, tied, mode
):
    from peft import PeftModel

    prepared = _train(make_model, new_ids, tmp_path / "a", tied=tied, mode=mode)
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert (ckpt / "adapter_config.json").is_file()
    assert not (ckpt / "model.safetensors").exists()
    prepared.model.eval()
    ours = prepared.model(input_ids).logits
    assert not torch.allclose(ours, make_model(tied=tied)(input_ids).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(make_model(tied=tied), str(ckpt))
    assert_close(peft_model(input_ids).logits, ours.double(), name="PEFT on the checkpoint")
    assert torch.equal(load_adapter(make_model(tied=tied), ckpt).model(input_ids).logits, ours)

    _train(
        make_model,
        new_ids,
        tmp_path / "b",
        tied=tied,
        mode=mode,
        resume=tmp_path / "a" / "checkpoint-2",
    )
    done = load_file(ckpt / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "b" / "checkpoint-4" / "adapter_model.safetensors")
    assert done.keys() == resumed.keys()
    for key in done:
        assert torch.equal(done[key], resumed[key]), key


def _word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t2", pad_token="t1")


@pytest.mark.parametrize("tied", [True, False])
def test_trl_sft_trainer_checkpoints_are_adapters(tmp_path, make_model, new_ids, tied):
    trl = pytest.importorskip("trl", reason="TRL is optional (it needs accelerate >= 1.10)")
    datasets = pytest.importorskip("datasets")
    from peft import PeftModel

    prepared = prepare_for_training(
        make_model(tied=tied), rank=4, alpha=8, embeddings="new_rows", new_token_ids=new_ids
    )
    rows = [{"input_ids": ids.tolist()} for ids in (x["input_ids"] for x in _dataset(8))]
    args = trl.SFTConfig(
        str(tmp_path / "sft"),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        bf16=False,  # else accelerate wraps the live forward in autocast: compare in fp32
        report_to=[],
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(
            model=prepared.model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=_word_tokenizer(256),
        )
        trainer.train()
        ckpt = tmp_path / "sft" / "checkpoint-2"
        assert not (ckpt / "model.safetensors").exists()
        ids = torch.tensor([rows[0]["input_ids"]])
        prepared.model.eval()
        peft_model = PeftModel.from_pretrained(make_model(tied=tied), str(ckpt))
    assert_close(peft_model(ids).logits, prepared.model(ids).logits.double(), name="TRL ckpt")
