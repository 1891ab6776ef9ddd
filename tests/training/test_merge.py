"""merge_adapters: merged checkpoint == unmerged model (tolerance rule), order, errors."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from llamazh.testing import assert_close, data_path
from llamazh.training import load_adapter, merge_adapters, prepare_for_training, save_adapter


def _save_base(model, path):
    model.save_pretrained(str(path), max_shard_size="150KB")
    tok = data_path("tokenizers/llama2.model")
    if tok is not None:
        shutil.copy(tok, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    return path


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _fold_in_memory(unmerged):
    """The baseline: the same merge done by plain PyTorch on the in-memory fp32 model."""
    from llamazh.training import LoRALinear, RowsEmbedding, RowsLinear

    model = copy.deepcopy(unmerged)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.base_layer.weight += m.delta_weight()
                m.lora_B.weight.zero_()
            elif isinstance(m, (RowsEmbedding, RowsLinear)):
                m.base_layer.weight.index_copy_(0, m.token_ids, m.rows)
    return model


def _assert_merged_equals(merged_dir, unmerged, input_ids):
    """Merged checkpoint vs the fp64 unmerged model, baseline: plain in-memory fp32 merge."""
    merged = _load(merged_dir)
    baseline = _fold_in_memory(unmerged)(input_ids).logits
    reference = copy.deepcopy(unmerged).double()(input_ids).logits
    assert_close(merged(input_ids).logits, reference, baseline, name="merged logits")


@pytest.mark.parametrize(
    ("tied", "mode"),
    [(False, "full"), (False, "new_rows"), (True, "new_rows"), (True, "full"), (False, "frozen")],
)
def test_merge_matches_unmerged(tmp_path, make_model, perturb, new_ids, input_ids, tied, mode):
    base = _save_base(make_model(tied=tied), tmp_path / "base")
    assert len(list(base.glob("*.safetensors"))) > 1
    model = _load(base)
    prepared = prepare_for_training(
        model, rank=4, alpha=8, embeddings=mode, lm_head=mode, new_token_ids=new_ids
    )
    perturb(prepared)
    save_adapter(prepared, tmp_path / "adapter")
    out = merge_adapters(base, tmp_path / "adapter", tmp_path / "merged", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    assert (out / "tokenizer_config.json").is_file()
    _assert_merged_equals(out, model, input_ids)


def test_two_adapters_in_order_with_vocabulary_growth(tmp_path, make_model, perturb, input_ids):
    """LLaMA-Plus then Alpaca: adapter 1 extends the vocabulary (new rows 200..255) on a
    200-token base; adapter 2 was trained on base + adapter 1 and adds a [PAD] row (257)."""
    base = _save_base(make_model(vocab_size=200), tmp_path / "base")
    m1 = _load(base)
    m1.resize_token_embeddings(256, mean_resizing=False)
    p1 = prepare_for_training(
        m1,
        rank=4,
        alpha=8,
        embeddings="new_rows",
        lm_head="new_rows",
        new_token_ids=range(200, 256),
    )
    perturb(p1, seed=1)

    class Tokenizer:  # anything with save_pretrained
        def save_pretrained(self, path):
            (Path(path) / "tokenizer_config.json").write_text('{"from": "adapter 1"}')

    save_adapter(p1, tmp_path / "a1", tokenizer=Tokenizer())
    stage1 = merge_adapters(base, [tmp_path / "a1"], tmp_path / "stage1", progress=False)
    m2 = _load(stage1)
    m2.resize_token_embeddings(257, mean_resizing=False)
    p2 = prepare_for_training(m2, rank=2, alpha=4, target_modules=("q_proj", "o_proj"))
    perturb(p2, seed=2)
    save_adapter(p2, tmp_path / "a2")
    out = merge_adapters(
        base, [tmp_path / "a1", tmp_path / "a2"], tmp_path / "merged", progress=False
    )
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 257
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "adapter 1"}
    assert not (out / "tokenizer.model").exists()  # one coherent tokenizer, not a mix
    _assert_merged_equals(out, m2, input_ids)


def test_merge_refuses_bad_input_and_writes_nothing(tmp_path, make_model, new_ids):
    base = _save_base(make_model(), tmp_path / "base")
    prepared = prepare_for_training(_load(base), rank=2, alpha=4)
    save_adapter(prepared, tmp_path / "a")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_adapters(base, tmp_path / "a", tmp_path / "exists", progress=False)

    deeper = _save_base(make_model(num_hidden_layers=3), tmp_path / "deeper")
    other = prepare_for_training(_load(deeper), rank=2, alpha=4)
    save_adapter(other, tmp_path / "a3")
    with pytest.raises(
        ValueError,
        match=r"targets 'model\.layers\.2\.[^']*' \(target_modules=.*\) but the base has no tensor",
    ):
        merge_adapters(base, tmp_path / "a3", tmp_path / "out", progress=False)

    wide = _save_base(make_model(intermediate_size=96), tmp_path / "wide")
    save_adapter(prepare_for_training(_load(wide), rank=2, alpha=4), tmp_path / "aw")
    with pytest.raises(ValueError, match="do not fit the base weight"):
        merge_adapters(base, tmp_path / "aw", tmp_path / "out", progress=False)

    big = _load(base)
    big.resize_token_embeddings(300, mean_resizing=False)
    save_adapter(prepare_for_training(big, rank=2, alpha=4, lm_head="frozen"), tmp_path / "av")
    with pytest.raises(ValueError, match="embed_tokens has 300 rows but lm_head has 256"):
        merge_adapters(base, tmp_path / "av", tmp_path / "out", progress=False)

    big = _load(base)
    big.resize_token_embeddings(300, mean_resizing=False)
    rows = prepare_for_training(
        big,
        rank=2,
        alpha=4,
        embeddings="new_rows",
        lm_head="new_rows",
        new_token_ids=range(280, 300),
    )
    save_adapter(rows, tmp_path / "ar")
    with pytest.raises(
        ValueError, match=r"rows \[256, 257, 258, 259, 260\] are not in the adapter"
    ):
        merge_adapters(base, tmp_path / "ar", tmp_path / "out", progress=False)

    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        merge_adapters(base, tmp_path / "a", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []


def test_merged_model_loads_adapter_free_and_matches_peft_merge(
    tmp_path, make_model, perturb, input_ids
):
    """Cross-check with PEFT's own merge_and_unload on the same adapter."""
    base = _save_base(make_model(), tmp_path / "base")
    prepared = prepare_for_training(_load(base), rank=4, alpha=8)
    perturb(prepared)
    save_adapter(prepared, tmp_path / "a")
    ours = _load(merge_adapters(base, tmp_path / "a", tmp_path / "m", progress=False))
    from peft import PeftModel

    peft_merged = PeftModel.from_pretrained(_load(base), str(tmp_path / "a")).merge_and_unload()
    reference = load_adapter(
        _load(base).double(), tmp_path / "a", adapter_dtype=torch.float64
    ).model
    assert_close(ours(input_ids).logits, reference(input_ids).logits, peft_merged(input_ids).logits)


def test_bf16_base_gets_the_fp32_update_rounded_once(tmp_path, make_model, perturb):
    from safetensors.torch import load_file

    base_model = make_model().to(torch.bfloat16)
    base_model.save_pretrained(str(tmp_path / "base"))
    prepared = prepare_for_training(
        _load(tmp_path / "base").to(torch.bfloat16),
        rank=4,
        alpha=8,
        embeddings="frozen",
        lm_head="frozen",
    )
    perturb(prepared)
    save_adapter(prepared, tmp_path / "a")
    out = merge_adapters(tmp_path / "base", tmp_path / "a", tmp_path / "m", progress=False)
    merged = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    lora = prepared.lora_modules()[name]
    expected = (lora.base_layer.weight.float() + lora.delta_weight()).to(torch.bfloat16)
    assert merged[f"{name}.weight"].dtype == torch.bfloat16
    assert torch.equal(merged[f"{name}.weight"], expected)
