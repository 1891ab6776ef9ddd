"""Resize a model's input embeddings and lm_head to an extended tokenizer."""

from __future__ import annotations

from typing import Any

import torch

from llamazh._checks import check_choice
from llamazh.tokenizer._sources import as_view, piece_splitter

#: ``init`` values accepted by :func:`resize_embeddings`.
RESIZE_INITS = ("subword_mean", "mean", "normal")


def resize_embeddings(
    model: Any,
    old_tokenizer: Any,
    new_tokenizer: Any,
    *,
    init: str = "subword_mean",
    head_init: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Grow ``model``'s input embeddings and lm_head from ``old_tokenizer`` to ``new_tokenizer``.

    ``new_tokenizer`` must extend ``old_tokenizer`` (its first ``len(old)`` pieces are the old
    ones, as :func:`merge_sentencepiece` guarantees). Old rows are copied bit for bit; new
    rows ``len(old) .. len(new) - 1`` are initialised by ``init``:

    * ``"subword_mean"`` (default): the mean of the *old* rows of the pieces the old
      tokenizer splits the new piece's text into (bytes included, as the old model saw it);
      pieces without text (control, unused padding) get the ``"mean"`` row. For byte-level
      BPE (:func:`extend_bpe`) the old model splits the new token's *bytes*, so tokens that
      are not whole characters (partial UTF-8) get their byte pieces' mean too.
    * ``"mean"``: the mean of all old rows.
    * ``"normal"``: i.i.d. ``N(0, initializer_range**2)`` (the model config's value, 0.02 if
      absent), what a freshly built model would hold; drawn from ``generator``.

    The new lm_head rows follow ``head_init``, by default ``init`` except that
    ``init="subword_mean"`` gives the lm_head ``"mean"`` rows: a subword-mean output row
    gives a new piece about the logit of its own subwords, so it steals probability from them
    wherever they are likely (measured in ``benchmarks/resize_init.py``: higher loss on both
    Chinese and English than mean rows). ``head_init="subword_mean"`` asks for it anyway.
    Tied embeddings stay one tensor, initialised by ``init``. Means are computed in fp32 and
    cast to the weight dtype. ``model.config.vocab_size`` is updated.

    Args:
        model: a transformers model (``get_input_embeddings``/``get_output_embeddings``).
        old_tokenizer: the tokenizer the model was trained with (SentencePiece model or HF
            fast tokenizer, e.g. a byte-level BPE directory).
        new_tokenizer: the extended tokenizer (same kinds, a ``MergeResult`` or a
            ``BPEExtension``).
        init: one of :data:`RESIZE_INITS`, for the input embedding rows.
        head_init: one of :data:`RESIZE_INITS` for the lm_head rows, or ``None`` (``init``,
            ``"mean"`` for ``"subword_mean"``). Must be ``None`` or ``init`` when tied.
        generator: random source for ``"normal"`` (CPU generator).

    Returns:
        ``torch.int64`` tensor of the new row ids, shape ``(len(new) - len(old),)``.

    Raises:
        ValueError: the model's embedding rows != ``len(old_tokenizer)``;
            ``new_tokenizer`` does not extend ``old_tokenizer``; ``init`` or ``head_init`` is
            unknown; ``head_init`` differs from ``init`` on tied embeddings.

    Example:
        >>> new_ids = resize_embeddings(model, "llama2.model", merged, init="subword_mean")
        >>> model.get_input_embeddings().weight.shape  # (len(merged.proto.pieces), hidden)
    """
    check_choice("init", init, RESIZE_INITS)
    if head_init is not None:
        check_choice("head_init", head_init, RESIZE_INITS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    old = as_view(old_tokenizer, "old_tokenizer")
    new = as_view(new_tokenizer, "new_tokenizer")
    n_old, n_new = len(old), len(new)
    if inp.weight.shape[0] != n_old:
        raise ValueError(
            f"model has {inp.weight.shape[0]} input embedding rows but old_tokenizer has "
            f"{n_old} pieces; old_tokenizer must be the tokenizer the model was trained with"
        )
    if n_new < n_old or new.pieces[:n_old] != old.pieces:
        bad = next((i for i in range(min(n_old, n_new)) if new.pieces[i] != old.pieces[i]), n_new)
        got = new.pieces[bad] if bad < n_new else "<missing>"
        raise ValueError(
            f"new_tokenizer must extend old_tokenizer (same pieces at ids 0..{n_old - 1}); "
            f"id {bad} is {got!r} in new_tokenizer but {old.pieces[bad]!r} in old_tokenizer"
        )
    tied = out is not None and out.weight is inp.weight
    if tied and head_init not in (None, init):
        raise ValueError(
            f"head_init={head_init!r} differs from init={init!r}, but the model ties its "
            "input embeddings and lm_head (one matrix); leave head_init=None"
        )
    if head_init is None:
        head_init = "mean" if init == "subword_mean" else init

    rows = _new_row_sources(old, new, init)
    inp_new = _grow(inp.weight, rows, init, generator, model)
    head_rows = rows if head_init == init else _new_row_sources(old, new, head_init)
    inp.weight = torch.nn.Parameter(inp_new, requires_grad=inp.weight.requires_grad)
    inp.num_embeddings = n_new
    if out is not None:
        if tied:
            out.weight = inp.weight
        else:
            out.weight = torch.nn.Parameter(
                _grow(out.weight, head_rows, head_init, generator, model),
                requires_grad=out.weight.requires_grad,
            )
        if getattr(out, "bias", None) is not None:
            bias = torch.zeros(n_new, dtype=out.bias.dtype, device=out.bias.device)
            bias[:n_old] = out.bias.detach()
            out.bias = torch.nn.Parameter(bias, requires_grad=out.bias.requires_grad)
        if hasattr(out, "out_features"):
            out.out_features = n_new
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        config.vocab_size = n_new
    return torch.arange(n_old, n_new, dtype=torch.int64)


def _new_row_sources(old: Any, new: Any, init: str) -> list[list[int] | None]:
    """For each new row, the old ids whose mean initialises it (``None``: the global mean)."""
    n_old, n_new = len(old), len(new)
    if init != "subword_mean":
        return [None] * (n_new - n_old)
    split = piece_splitter(old)
    usable = _textual(new, n_old)
    added = _added_texts(new)  # added tokens match raw text: the old tokenizer encodes it
    return [
        (old.encode([added[i]])[0] if i in added else split(new.pieces[i])) or None
        if usable[i - n_old]
        else None
        for i in range(n_old, n_new)
    ]


def _added_texts(view: Any) -> dict[int, str]:
    """Id -> text of a Hugging Face tokenizer's added (non-special) tokens, e.g. ``add_tokens``."""
    if view.kind != "hf":
        return {}
    backend = getattr(view.obj, "backend_tokenizer", view.obj)
    decoder = getattr(backend, "get_added_tokens_decoder", lambda: {})()
    return {i: t.content for i, t in decoder.items() if not t.special}


def _textual(view: Any, start: int) -> list[bool]:
    """Whether each piece from ``start`` on stands for text (not control/unused/special)."""
    if view.proto is not None:
        from llamazh.tokenizer._proto import NORMAL, USER_DEFINED

        return [p.type in (NORMAL, USER_DEFINED) for p in view.proto.pieces[start:]]
    specials = set(getattr(view.obj, "all_special_tokens", []) or [])
    return [p not in specials for p in view.pieces[start:]]


def _grow(
    weight: torch.Tensor,
    rows: list[list[int] | None],
    init: str,
    generator: torch.Generator | None,
    model: Any,
) -> torch.Tensor:
    """``weight`` (V_old, D) -> (V_old + len(rows), D), old rows copied exactly."""
    old = weight.detach()
    n_old, dim = old.shape
    grown = torch.empty(n_old + len(rows), dim, dtype=old.dtype, device=old.device)
    grown[:n_old] = old
    if not rows:
        return grown
    old32 = old.float()
    if init == "normal":
        std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
        draw = torch.randn(len(rows), dim, generator=generator, dtype=torch.float32)
        grown[n_old:] = (draw * std).to(device=old.device, dtype=old.dtype)
        return grown
    new = old32.mean(dim=0).expand(len(rows), dim).clone()  # (R, D)
    flat = [i for ids in rows if ids for i in ids]
    if flat:
        seg = [j for j, ids in enumerate(rows) if ids for _ in ids]
        seg_t = torch.tensor(seg, device=old.device)
        sums = torch.zeros_like(new).index_add_(
            0, seg_t, old32[torch.tensor(flat, device=old.device)]
        )
        counts = torch.bincount(seg_t, minlength=len(rows))
        has = counts > 0
        new[has] = sums[has] / counts[has].unsqueeze(1).float()
    grown[n_old:] = new.to(old.dtype)
    return grown
