"""prepare_for_training: modes, tied weights, report, parameter groups, undo, errors,
gradient checkpointing and torch.compile."""

from __future__ import annotations

import pytest
import torch

from llamazh.testing import assert_grad_close
from llamazh.training import LoRALinear, RowsEmbedding, RowsLinear, prepare_for_training

H = 64


def _loss(model, ids):
    return model(ids, labels=ids).loss


@pytest.mark.parametrize("tied", [False, True])
def test_modes_make_exactly_the_right_parameters_trainable(make_model, new_ids, tied):
    model = make_model(tied=tied)
    n_lora = sum(
        m.in_features * 4 + m.out_features * 4
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    for mode, per_matrix in (("frozen", 0), ("full", 256 * H), ("new_rows", len(new_ids) * H)):
        model = make_model(tied=tied)
        prepared = prepare_for_training(
            model, rank=4, alpha=8, embeddings=mode, lm_head=mode, new_token_ids=new_ids
        )
        report = prepared.report()
        assert report.by_kind["lora"] == n_lora
        assert report.by_kind["embeddings"] == per_matrix
        assert report.by_kind["lm_head"] == (0 if tied else per_matrix)
        assert "lora" in str(report) and "total" in str(report)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(".lora_" in n or "embed" in n or "lm_head" in n for n in names)


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_gradients_exist_only_for_new_rows(make_model, new_ids, input_ids, tied):
    model = make_model(tied=tied)
    prepared = prepare_for_training(
        model, rank=4, alpha=8, embeddings="new_rows", lm_head="new_rows", new_token_ids=new_ids
    )
    ids = input_ids.clone()
    ids[0, :3] = torch.tensor(new_ids[:3])
    _loss(model, ids).backward()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, RowsEmbedding) and isinstance(head, RowsLinear)
    assert emb.base_layer.weight.grad is None and head.base_layer.weight.grad is None
    assert emb.rows.grad.shape == (len(new_ids), H)
    if tied:
        assert head.rows is emb.rows and prepared.report().by_kind["lm_head"] == 0

    # the gradient equals the full-embedding gradient restricted to the new rows
    full = make_model(tied=tied)
    prepare_for_training(full, rank=4, alpha=8, embeddings="full", lm_head="full")
    _loss(full, ids).backward()
    expected = full.get_input_embeddings().weight.grad[new_ids]
    assert_grad_close(emb.rows.grad, expected.double(), expected, name="new-row gradient")
    if not tied:
        expected_head = full.get_output_embeddings().weight.grad[new_ids]
        assert_grad_close(
            head.rows.grad, expected_head.double(), expected_head, name="lm_head rows"
        )


def test_optimizer_state_scales_with_new_rows(make_model, new_ids, input_ids):
    model = make_model()
    prepared = prepare_for_training(
        model, rank=4, alpha=8, embeddings="new_rows", lm_head="new_rows", new_token_ids=new_ids
    )
    opt = torch.optim.AdamW(prepared.param_groups(1e-3, embedding_lr=5e-4))
    assert [g["name"] for g in opt.param_groups] == ["lora", "embeddings"]
    assert opt.param_groups[1]["lr"] == 5e-4 and opt.param_groups[1]["weight_decay"] == 0.0
    _loss(model, input_ids).backward()
    opt.step()
    state_elems = sum(s["exp_avg"].numel() for s in opt.state.values())
    assert state_elems == prepared.report().trainable
    assert prepared.report().by_kind["embeddings"] == len(new_ids) * H


def test_a_few_steps_reduce_the_loss(make_model, new_ids, input_ids):
    model = make_model().train()
    prepared = prepare_for_training(
        model,
        rank=4,
        alpha=8,
        dropout=0.0,
        embeddings="new_rows",
        lm_head="new_rows",
        new_token_ids=new_ids,
    )
    opt = torch.optim.AdamW(prepared.param_groups(1e-2))
    ids = input_ids % 56 + 200  # only new tokens: the rows must learn
    losses = []
    for _ in range(8):
        loss = _loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_undo_restores_the_model(make_model, new_ids, input_ids):
    model = make_model()
    keys = list(model.state_dict())
    before = model(input_ids).logits
    prepared = prepare_for_training(
        model, embeddings="new_rows", lm_head="new_rows", new_token_ids=new_ids
    )
    with torch.no_grad():
        for m in prepared.lora_modules().values():
            m.lora_B.weight.normal_()
    prepared.undo()
    assert list(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.equal(model(input_ids).logits, before)
    prepare_for_training(model)  # can be prepared again


def test_bad_arguments_are_clear_errors(make_model, new_ids):
    model = make_model()
    with pytest.raises(
        ValueError, match=r"target_modules=\('nope',\) matches no nn.Linear.*'q_proj'"
    ):
        prepare_for_training(model, target_modules=("nope",))
    with pytest.raises(ValueError, match="matches the lm_head"):
        prepare_for_training(model, target_modules=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="new_token_ids is empty"):
        prepare_for_training(model, embeddings="new_rows")
    with pytest.raises(ValueError, match=r"must be in \[0, 256\).*\[256, 300\]"):
        prepare_for_training(model, embeddings="new_rows", new_token_ids=[5, 256, 300])
    with pytest.raises(ValueError, match="distinct"):
        prepare_for_training(model, embeddings="new_rows", new_token_ids=[5, 5])
    with pytest.raises(TypeError, match="1-D integer tensor"):
        prepare_for_training(model, embeddings="new_rows", new_token_ids=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="embeddings must be one of"):
        prepare_for_training(model, embeddings="partial")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        prepare_for_training(model, rank=0)
    with pytest.raises(ValueError, match=r"cannot differ.*Name one of them"):
        prepare_for_training(make_model(tied=True), embeddings="full", lm_head="frozen")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing left behind
    prepare_for_training(model, rank=2, alpha=4)
    with pytest.raises(ValueError, match="prepared twice"):
        prepare_for_training(model)


def test_regex_targets_like_peft(make_model):
    prepared = prepare_for_training(
        make_model(), rank=2, alpha=4, target_modules=r".*\.0\.self_attn\.(q|v)_proj"
    )
    assert sorted(prepared.lora_modules()) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["new_rows", "frozen"])
def test_gradient_checkpointing_gives_the_same_gradients(
    make_model, new_ids, input_ids, perturb, mode
):
    runs = []
    for checkpointing in (False, True):
        model = make_model().train()
        prepared = prepare_for_training(
            model,
            rank=4,
            alpha=8,
            dropout=0.0,
            embeddings=mode,
            lm_head=mode,
            new_token_ids=new_ids,
            gradient_checkpointing=checkpointing,
        )
        perturb(prepared)
        active = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        assert active == checkpointing
        _loss(model, input_ids).backward()
        runs.append(_grads(model))
    assert runs[0].keys() == runs[1].keys() and any("lora_A" in k for k in runs[0])
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_torch_compile(make_model, new_ids, input_ids, perturb):
    pytest.importorskip("torch._dynamo")
    model = make_model()
    prepared = prepare_for_training(
        model,
        rank=4,
        alpha=8,
        dropout=0.0,
        embeddings="new_rows",
        lm_head="new_rows",
        new_token_ids=new_ids,
    )
    perturb(prepared)
    eager_loss = _loss(model, input_ids)
    eager_loss.backward()
    eager = _grads(model)
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    loss = compiled(input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.allclose(loss, eager_loss, rtol=0, atol=1e-6)
    for k, g in _grads(model).items():
        assert_grad_close(g, eager[k].double(), eager[k], name=k)


def test_autocast_runs_and_keeps_adapter_dtype(make_model, new_ids, input_ids):
    model = make_model()
    prepared = prepare_for_training(
        model, rank=4, alpha=8, embeddings="new_rows", lm_head="new_rows", new_token_ids=new_ids
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids, labels=input_ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    rows = model.get_input_embeddings().rows
    assert rows.dtype == torch.float32 and rows.grad.dtype == torch.float32
    assert all(p.grad is not None for _, p in prepared.named_trainable()["lora"])
