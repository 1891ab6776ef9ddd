"""Load a PEFT-format adapter onto a model: :func:`load_adapter` (the file layout and the
reading live in :mod:`llamazh.training.adapters`)."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from llamazh.training.adapters import (
    ROWS_SUFFIX,
    _entries,
    check_fits,
    read_adapter,
    read_metadata,
)
from llamazh.training.config import AdapterConfig
from llamazh.training.prepare import prepare_for_training
from llamazh.training.prepared import PreparedModel, prepared_of


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    trainable: bool = False,
    allow_pickle: bool = False,
    adapter_dtype: torch.dtype | None = torch.float32,
) -> PreparedModel:
    """Load a PEFT-format LoRA adapter (ours or one PEFT wrote) onto ``model``.

    An unprepared model is prepared from the adapter's config first; a prepared one (resuming
    training) must have the same layout. Loading is strict: every tensor the layout needs must
    be in the file with the right shape, and nothing else may be.

    Args:
        model: the base causal LM, already resized to the adapter's vocabulary if it was extended.
        path: the adapter directory.
        trainable: leave the adapter's parameters trainable (default: frozen, for inference).
        allow_pickle: read a pickled ``adapter_model.bin`` with ``torch.load(weights_only=True)``.
        adapter_dtype: dtype of the LoRA factors and new rows when the model is prepared here.

    Returns:
        The :class:`PreparedModel`.

    Raises:
        ValueError: vocabulary or shape mismatch, missing/unexpected tensors, unsupported PEFT
            features, a pickled file without ``allow_pickle`` (the model is left unchanged).

    Example:
        >>> prepared = load_adapter(base_model, "runs/zh-lora")
        >>> logits = prepared.model(input_ids).logits
    """
    config, tensors = read_adapter(path, allow_pickle=allow_pickle)
    prepared = prepared_of(model)
    created = prepared is None
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = prepared.tied if prepared else head is not None and head.weight is embed.weight
    check_fits(path, read_metadata(path), vocab=embed.weight.shape[0], tied=tied)
    if created:
        names = {m: n for n, m in model.named_modules() if m is embed or m is head}
        cfg = AdapterConfig.from_peft(
            config,
            embed_name=names[embed].rpartition(".")[2],
            head_name=names[head].rpartition(".")[2],
            tied=tied,
        )
        if tied and cfg.embeddings != cfg.lm_head:
            raise ValueError(
                f"adapter {str(path)!r} trains embed_tokens as {cfg.embeddings!r} and lm_head as "
                f"{cfg.lm_head!r} (two matrices) but the model ties them; load it into a base "
                "with tie_word_embeddings=False"
            )
        _check_vocab(cfg, tensors, names[embed], names[head], embed.weight.shape[0], path)
        prepared = prepare_for_training(
            model,
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            embeddings=cfg.embeddings,
            lm_head=cfg.lm_head,
            new_token_ids=cfg.new_token_ids,
            rslora=cfg.rslora,
            adapter_dtype=adapter_dtype,
            base_model_name_or_path=cfg.base_model_name_or_path,
        )
    try:
        _load_into(prepared, tensors, path)
    except BaseException:
        if created:
            prepared.undo()
        raise
    for group in prepared.named_trainable().values():
        for _, p in group:
            p.requires_grad_(trainable)
    if not trainable:
        prepared.model.eval()  # as PEFT's from_pretrained: no dropout unless training
    return prepared


def _check_vocab(cfg, tensors, embed_name, head_name, vocab, path) -> None:
    for name in (embed_name, head_name):
        t = tensors.get(f"{name}.weight")
        if t is not None and t.shape[0] != vocab:
            raise ValueError(
                f"adapter {str(path)!r} has a {name} with vocabulary {t.shape[0]} but the model "
                f"has {vocab}; resize the model to the adapter's tokenizer first "
                "(llamazh.tokenizer.resize_embeddings)"
            )
    bad = [i for i in cfg.new_token_ids if i >= vocab]
    if bad:
        raise ValueError(
            f"adapter {str(path)!r} trains token ids up to {max(bad)} but the model's vocabulary "
            f"is {vocab}; resize the model to the adapter's tokenizer first"
        )


def _load_into(prepared: PreparedModel, tensors: dict[str, Tensor], path) -> None:
    expected = {k: tuple(v.shape) for k, v in _entries(prepared).items()}
    head_key = f"{prepared.head_name}.weight"
    extra = {k: v for k, v in tensors.items() if k not in expected}
    tied_copy = extra.pop(head_key) if prepared.tied and head_key in extra else None
    # PEFT writes both copies of a tied matrix; they must agree
    embed_key = f"{prepared.embed_name}.weight"
    if tied_copy is not None and not torch.equal(tied_copy, tensors.get(embed_key, tied_copy)):
        raise ValueError(
            f"adapter {str(path)!r} has different embed and lm_head matrices but the model "
            "ties them; load it into a model with tie_word_embeddings=False"
        )
    tied_rows = f"{prepared.head_name}{ROWS_SUFFIX}"
    embed_rows = tensors.get(f"{prepared.embed_name}{ROWS_SUFFIX}")
    if prepared.tied and tied_rows in extra:
        head_rows = extra.pop(tied_rows)
        if embed_rows is None or not torch.equal(head_rows, embed_rows):
            raise ValueError(
                f"adapter {str(path)!r} trains lm_head rows of its own but the model ties "
                "lm_head to the embedding; load it into a model with tie_word_embeddings=False "
                "(loading it here would drop the trained lm_head rows)"
            )
    missing = sorted(k for k in expected if k not in tensors)
    if missing or extra:
        raise ValueError(
            f"adapter {str(path)!r} does not match the model: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''} ({len(missing)}), unexpected "
            f"{sorted(extra)[:4]} ({len(extra)}); check target_modules and the embedding modes"
        )
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {s}"
        for k, s in expected.items()
        if tuple(tensors[k].shape) != s
    ]
    if wrong:
        raise ValueError(f"adapter {str(path)!r} has tensors of the wrong shape: {wrong[:4]}")
    live = _entries(prepared)
    with torch.no_grad():
        for key, target in live.items():
            target.copy_(tensors[key].to(target.dtype))
