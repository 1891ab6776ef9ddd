"""Argument checks of :func:`llamazh.training.align_embeddings` that need more than
``llamazh._checks``: that the tokenizers and both models fit together."""

from __future__ import annotations

from typing import Any


def _check_models(model: Any, base_model: Any, old_tok: Any, new_tok: Any) -> tuple[int, int]:
    """(len(old), len(new)) after checking that the tokenizers and the models fit together."""
    from llamazh.tokenizer._sources import as_view
    from llamazh.tokenizer.resize import check_extends

    if model is base_model:
        raise ValueError(
            "model and base_model are the same object; pass the original as base_model"
        )
    old, new = as_view(old_tok, "old_tokenizer"), as_view(new_tok, "new_tokenizer")
    check_extends(old, new)
    n_old, n_new = len(old), len(new)
    if n_new == n_old:
        raise ValueError("new_tokenizer adds no token to old_tokenizer: there is nothing to align")
    for name, m, n, tok in (
        ("model", model, n_new, "new"),
        ("base_model", base_model, n_old, "old"),
    ):
        rows = m.get_input_embeddings().weight.shape[0]
        if rows != n:
            raise ValueError(
                f"{name} has {rows} embedding rows but {tok}_tokenizer has {n} tokens; "
                + (
                    "resize it first (llamazh.tokenizer.resize_embeddings)"
                    if name == "model"
                    else "base_model must be the model before resizing"
                )
            )
    out = model.get_output_embeddings()
    if out is None or out.weight.shape[0] != n_new:
        raise ValueError(f"model's lm_head must have {n_new} rows (resize_embeddings grows it)")
    return n_old, n_new
