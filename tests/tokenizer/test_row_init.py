"""Row-initialisation strategies against plain references, and resize_embeddings' untie."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamazh.testing import tiny_llama
from llamazh.tokenizer import RESIZE_INITS, resize_embeddings
from llamazh.tokenizer.resize import untie_embeddings
from llamazh.tokenizer.row_init import ROW_INITS, MeanRows, NormalRows, PieceRows, get_row_init

pieces_st = st.lists(
    st.one_of(st.none(), st.lists(st.integers(0, 19), min_size=1, max_size=5)),
    min_size=1,
    max_size=8,
)


def _reference(weight: torch.Tensor, ids: list[int] | None, decay: float) -> torch.Tensor:
    """The weighted mean written out: weights exp(decay * i), normalised."""
    if not ids:
        return weight.double().mean(0)
    w = [math.exp(decay * i) for i in range(len(ids))]
    return sum(wi * weight[j].double() for wi, j in zip(w, ids)) / sum(w)


@settings(max_examples=40, deadline=None)
@given(pieces=pieces_st, decay=st.sampled_from([0.0, 2.0, -2.0, 0.7]), seed=st.integers(0, 99))
def test_piece_rows_match_reference(pieces, decay, seed):
    weight = torch.randn(20, 6, generator=torch.Generator().manual_seed(seed))
    got = PieceRows(decay).rows(weight, pieces)
    want = torch.stack([_reference(weight, p, decay) for p in pieces]).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_named_strategies():
    assert set(RESIZE_INITS) == set(ROW_INITS)
    weight = torch.arange(12.0).view(4, 3)
    assert torch.equal(MeanRows().rows(weight, [None, [1]]), weight.mean(0).expand(2, 3))
    last = get_row_init("last_heavy").rows(weight, [[0, 3]])[0]
    first = get_row_init("first_heavy").rows(weight, [[0, 3]])[0]
    assert (last - weight[3]).norm() < (last - weight[0]).norm()
    assert (first - weight[0]).norm() < (first - weight[3]).norm()
    g = torch.Generator().manual_seed(0)
    drawn = NormalRows(0.5).rows(torch.zeros(3, 400), [None] * 50, generator=g)
    assert abs(drawn.std().item() - 0.5) < 0.05
    with pytest.raises(ValueError, match="init must be one of"):
        get_row_init("zeros")
    with pytest.raises(TypeError, match="init must be a name"):
        get_row_init(3)
    with pytest.raises(ValueError, match="decay must be finite"):
        PieceRows(float("nan"))


def test_untie_copies_and_marks_config():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert untie_embeddings(model) and not untie_embeddings(model)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    assert model.config.tie_word_embeddings is False


def test_resize_untie_then_save_and_load(tmp_path, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamazh.tokenizer import extend_bpe

    old = AutoTokenizer.from_pretrained(smollm2_dir)
    ext = extend_bpe(smollm2_dir, ["中文的文本。" * 20, "机器学习很有趣。" * 20], new_tokens=12)
    ext.save(tmp_path / "tok")
    new = AutoTokenizer.from_pretrained(tmp_path / "tok")
    model = tiny_llama(vocab_size=len(old), tie_word_embeddings=True)
    ids = resize_embeddings(model, old, new, untie=True)
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert emb is not head and emb.shape == head.shape == (len(new), 64)
    assert not torch.equal(emb[ids], head[ids])  # last_heavy input, first_heavy output
    model.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert back.lm_head.weight is not back.get_input_embeddings().weight
    torch.testing.assert_close(back.lm_head.weight, head, rtol=0, atol=0)
    torch.testing.assert_close(back.get_input_embeddings().weight, emb, rtol=0, atol=0)
    # tied without untie: one matrix, and head_init may not differ
    tied = tiny_llama(vocab_size=len(old), tie_word_embeddings=True)
    with pytest.raises(ValueError, match="untie=True"):
        resize_embeddings(tied, old, new, head_init="mean")
    resize_embeddings(tied, old, new)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
