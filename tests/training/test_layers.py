"""LoRALinear, RowsEmbedding and RowsLinear against plain PyTorch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from llamazh.testing import assert_close, assert_grad_close
from llamazh.training import LoRALinear, RowsEmbedding, RowsLinear
from llamazh.training.embeddings import rows_reference


def test_lora_linear_matches_dense_update():
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=True)
    layer = LoRALinear(base, rank=4, alpha=8).eval()
    x = torch.randn(3, 5, 24)
    assert torch.equal(layer(x), base(x))  # B = 0 at init: a no-op
    nn.init.normal_(layer.lora_B.weight)
    dense = F.linear(
        x.double(), base.weight.double() + layer.delta_weight().double(), base.bias.double()
    )
    same_dtype = F.linear(x, base.weight + layer.delta_weight(), base.bias)
    assert_close(layer(x), dense, same_dtype)


def test_lora_linear_rejects_bad_arguments():
    with pytest.raises(TypeError, match="base_layer"):
        LoRALinear(nn.Conv1d(2, 2, 1), rank=2, alpha=2)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=2)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), rank=2, alpha=2, dropout=1.5)


@st.composite
def _rows_case(draw):
    vocab = draw(st.integers(3, 113))
    hidden = draw(st.sampled_from([1, 7, 16, 33]))
    n = draw(st.integers(1, vocab))
    if draw(st.booleans()):  # a vocabulary extension: one contiguous run at the end
        ids = list(range(vocab - n, vocab))
    else:
        ids = draw(st.permutations(range(vocab)))[:n]
    return vocab, hidden, ids, draw(st.integers(0, 2**16))


@given(_rows_case())
def test_rows_layers_match_index_copy_reference(case):
    vocab, hidden, ids, seed = case
    torch.manual_seed(seed)
    id_t = torch.tensor(ids)
    emb, head = (
        nn.Embedding(vocab, hidden).requires_grad_(False),
        nn.Linear(hidden, vocab, bias=False),
    )
    head.requires_grad_(False)
    r_emb, r_head = RowsEmbedding(emb, id_t), RowsLinear(head, id_t)
    with torch.no_grad():
        for m in (r_emb, r_head):
            m.rows.add_(torch.randn_like(m.rows))
    tokens = torch.randint(0, vocab, (2, 13))
    x = torch.randn(2, 13, hidden, requires_grad=True)

    def reference(dtype):
        rows_e = r_emb.rows.detach().to(dtype).requires_grad_()
        rows_h = r_head.rows.detach().to(dtype).requires_grad_()
        xr = x.detach().to(dtype).requires_grad_()
        out_e = F.embedding(tokens, rows_reference(emb.weight.to(dtype), id_t, rows_e))
        out_h = F.linear(xr, rows_reference(head.weight.to(dtype), id_t, rows_h))
        return out_e, out_h, rows_e, rows_h, xr

    ge = torch.randn(2, 13, hidden)
    gh = torch.randn(2, 13, vocab)
    out_e, out_h = r_emb(tokens), r_head(x)
    (out_e * ge).sum().add((out_h * gh).sum()).backward()
    results = []
    for dtype in (torch.float64, torch.float32):
        e, h, re, rh, xr = reference(dtype)
        (e * ge.to(dtype)).sum().add((h * gh.to(dtype)).sum()).backward()
        results.append((e, h, re.grad, rh.grad, xr.grad))
    (e64, h64, ge64, gh64, gx64), (e32, h32, ge32, gh32, gx32) = results
    assert_close(out_e, e64, e32, name="embedding")
    assert_close(out_h, h64, h32, name="lm_head")
    assert_grad_close(r_emb.rows.grad, ge64, ge32, name="embedding rows grad")
    assert_grad_close(r_head.rows.grad, gh64, gh32, name="lm_head rows grad")
    assert_grad_close(x.grad, gx64, gx32, name="lm_head input grad")
    assert emb.weight.grad is None and head.weight.grad is None


def test_rows_lm_head_gradcheck_both_paths():
    torch.manual_seed(0)
    head = nn.Linear(5, 40, bias=False).double().requires_grad_(False)
    for ids in (torch.arange(30, 40), torch.randperm(40)[:23]):  # segments / scatter path
        layer = RowsLinear(head, ids)
        x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, r, layer=layer: torch.func.functional_call(layer, {"rows": r}, (x,)),
            (x, layer.rows.detach().clone().requires_grad_()),
        )
