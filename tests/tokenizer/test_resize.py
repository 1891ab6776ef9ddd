"""resize_embeddings on a tiny Llama with the Llama-2 vocabulary, against an independent
oracle: the subword split comes from the fast tokenizer's BPE model, not sentencepiece."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamazh.testing import tiny_llama
from llamazh.tokenizer import build_fast_tokenizer, resize_embeddings
from llamazh.tokenizer.row_init import get_row_init


def _model(tied=False, dtype=torch.float32):
    return tiny_llama(seed=0, dtype=dtype, vocab_size=32000, tie_word_embeddings=tied)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_old_rows_bit_identical_and_subword_mean(llama2_model_path, merged_rank, dtype):
    model = _model(dtype=dtype)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    ids = resize_embeddings(model, llama2_model_path, merged_rank, init="subword_mean",
                            head_init="mean")  # fmt: skip
    n_old, n_new = 32000, merged_rank.final_size
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(n_old, n_new))
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape == (n_new, 64) and head.shape == (n_new, 64) and emb.dtype == dtype
    assert torch.equal(emb[:n_old], emb0) and torch.equal(head[:n_old], head0)
    assert model.config.vocab_size == n_new
    oracle = build_fast_tokenizer(llama2_model_path).model
    probe = [n_old, n_old + 7, (n_old + n_new) // 2, n_new - 1]
    splits = {i: [t.id for t in oracle.tokenize(merged_rank.proto.pieces[i].piece)] for i in probe}
    for new_id, split in splits.items():
        assert torch.equal(emb[new_id], emb0[split].float().mean(0).to(dtype)), (new_id, split)
    # head_init="mean": the global mean; subword means only when asked
    assert torch.equal(head[n_old:], head0.float().mean(0).to(dtype).expand(n_new - n_old, -1))
    model = _model(dtype=dtype)
    resize_embeddings(model, llama2_model_path, merged_rank, head_init="subword_mean")
    head = model.get_output_embeddings().weight
    for new_id, split in splits.items():
        assert torch.equal(head[new_id], head0[split].float().mean(0).to(dtype)), (new_id, split)
    out = model(torch.tensor([[1, n_new - 1, 5]])).logits
    assert out.shape == (1, 3, n_new) and torch.isfinite(out).all()
    # the defaults on an untied model: input rows last_heavy, lm_head rows first_heavy
    model = _model(dtype=dtype)
    resize_embeddings(model, llama2_model_path, merged_rank)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for new_id, split in splits.items():
        want_in = get_row_init("last_heavy").rows(emb0, [split])[0].to(dtype)
        want_out = get_row_init("first_heavy").rows(head0, [split])[0].to(dtype)
        assert torch.equal(emb[new_id], want_in) and torch.equal(head[new_id], want_out)


def test_mean_init_tied_and_padding(llama2_model_path, zh_model_path):
    from llamazh.tokenizer import merge_sentencepiece

    merged = merge_sentencepiece(llama2_model_path, zh_model_path, pad_to_multiple=128)
    model = _model(tied=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    emb0 = model.get_input_embeddings().weight.detach().clone()
    resize_embeddings(model, llama2_model_path, merged, init="mean")
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb
    assert torch.equal(emb[:32000], emb0)
    mean = emb0.mean(0)
    assert torch.equal(emb[32000:], mean.expand(merged.final_size - 32000, -1))
    # padding pieces have no text: subword_mean gives them the mean row too
    model = _model()
    resize_embeddings(model, llama2_model_path, merged)
    assert torch.equal(model.get_input_embeddings().weight[-1], mean)


@settings(max_examples=3)
@given(seed=st.integers(0, 2**31 - 1))
def test_normal_init_is_seeded(llama2_model_path, merged_rank, seed):
    rows = []
    for _ in range(2):
        model = _model()
        g = torch.Generator().manual_seed(seed)
        resize_embeddings(model, llama2_model_path, merged_rank, init="normal", generator=g)
        rows.append(model.get_input_embeddings().weight[32000:].detach())
    assert torch.equal(rows[0], rows[1])
    std = model.config.initializer_range
    assert abs(rows[0].std().item() - std) < 0.1 * std and abs(rows[0].mean().item()) < 0.1 * std


def test_errors(llama2_model_path, merged_rank, zh_model_path):
    model = tiny_llama(vocab_size=31999)
    with pytest.raises(ValueError, match="31999 input embedding rows but old_tokenizer has 32000"):
        resize_embeddings(model, llama2_model_path, merged_rank)
    with pytest.raises(ValueError, match="new_tokenizer must extend old_tokenizer"):
        resize_embeddings(_model(), llama2_model_path, zh_model_path)
    with pytest.raises(ValueError, match="init must be one of"):
        resize_embeddings(_model(), llama2_model_path, merged_rank, init="zeros")
    with pytest.raises(ValueError, match="head_init must be one of"):
        resize_embeddings(_model(), llama2_model_path, merged_rank, head_init="zeros")
    tied = _model(tied=True)
    with pytest.raises(ValueError, match="head_init='mean' differs from init='subword_mean'"):
        resize_embeddings(tied, llama2_model_path, merged_rank, head_init="mean")
    assert tied.get_input_embeddings().weight.shape[0] == 32000  # nothing changed


@pytest.mark.parametrize("family", ["smollm2", "llama3"])
def test_byte_level_bpe_tied_subword_mean(bpe_bases, bpe_extensions, family):
    """New rows are the mean of the base split of each new token's bytes (partial UTF-8
    tokens included); SmolLM2-style tied embeddings stay one tensor."""
    from llamazh.tokenizer._bytelevel import token_bytes

    base, ext = bpe_bases[family], bpe_extensions[family]
    n_old, n_new = ext.base_vocab_size, ext.vocab_size
    model = tiny_llama(seed=0, vocab_size=n_old, tie_word_embeddings=True)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    ids = resize_embeddings(model, base, ext)
    assert torch.equal(ids, torch.arange(n_old, n_new))
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb and emb.shape == (n_new, 64)
    assert torch.equal(emb[:n_old], emb0) and model.config.vocab_size == n_new
    partial = [k for k, t in enumerate(ext.new_tokens) if not _utf8(token_bytes(t))]
    whole = [k for k, t in enumerate(ext.new_tokens) if _utf8(token_bytes(t))]
    assert partial and whole
    for k in [*partial[:5], *whole[:5], len(ext.new_tokens) - 1]:
        # oracle: encode the token's bytes as text where they are whole characters, else
        # split the byte-level string with the base BPE model alone
        data = token_bytes(ext.new_tokens[k])
        if _utf8(data):
            split = base.encode(data.decode("utf-8"), add_special_tokens=False).ids
            pre = base.pre_tokenizer.pre_tokenize_str(data.decode("utf-8"))
            if len(pre) != 1:
                continue  # the pre-tokenizer would cut it; the model split is what counts
        else:
            split = [t.id for t in base.model.tokenize(ext.new_tokens[k])]
        assert len(split) > 1
        assert torch.equal(emb[n_old + k], emb0[split].mean(0)), (k, split)
    out = model(torch.tensor([[1, n_new - 1, 5]])).logits
    assert out.shape == (1, 3, n_new) and torch.isfinite(out).all()


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
