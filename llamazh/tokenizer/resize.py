"""Resize a model's input embeddings and lm_head to an extended tokenizer."""

from __future__ import annotations

from typing import Any

import torch

from llamazh.tokenizer._sources import as_view, piece_splitter
from llamazh.tokenizer.row_init import ROW_INITS, NormalRows, RowInit, get_row_init

#: ``init`` names accepted by :func:`resize_embeddings` (see :data:`ROW_INITS`).
RESIZE_INITS = tuple(ROW_INITS)

#: The defaults (``benchmarks/vocab_transfer.py``: SmolLM2-135M + 1k-20k ``extend_bpe`` tokens,
#: held-out Chinese bits/char before any training; docs/benchmarks.md): untied input rows lean
#: on the last piece and lm_head rows on the first, what ``align_embeddings`` was measured
#: from; a shared (tied) row is the plain sub-word mean. Before alignment the sub-word mean on
#: both sides starts lower at 5,000 and 20,000 tokens (7.20 / 6.92 vs 7.33 / 7.44 bits/char;
#: 1,000 tokens: 8.11 vs 7.99), but aligned for 120 CPU s it ends higher (5,000 tokens: 7.31 vs
#: 7.03).
DEFAULT_INIT = "last_heavy"
DEFAULT_HEAD_INIT = "first_heavy"
DEFAULT_TIED_INIT = "subword_mean"


def resize_embeddings(
    model: Any,
    old_tokenizer: Any,
    new_tokenizer: Any,
    *,
    init: str | RowInit | None = None,
    head_init: str | RowInit | None = None,
    untie: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Grow ``model``'s input embeddings and lm_head from ``old_tokenizer`` to ``new_tokenizer``.

    ``new_tokenizer`` must extend ``old_tokenizer`` (its first ``len(old)`` pieces are the old
    ones, as :func:`merge_sentencepiece` and :func:`extend_bpe` guarantee). Old rows are copied
    bit for bit; new rows ``len(old) .. len(new) - 1`` are initialised by the strategies of
    :mod:`llamazh.tokenizer.row_init` (a name from :data:`RESIZE_INITS` or a ``RowInit``):

    * ``"last_heavy"`` (default for input rows): the pieces the old tokenizer splits the new
      token into, weighted towards the last; ``"subword_mean"``: their plain mean (FVT);
      ``"first_heavy"``: weighted towards the first. For byte-level BPE the old tokenizer
      splits the token's *bytes*, so partial UTF-8 tokens get their byte pieces too; added
      tokens (``add_tokens``) are split as the old tokenizer encodes their text; pieces without
      text (control, unused padding) get the ``"mean"`` row.
    * ``"mean"`` (default for lm_head rows): the mean of all old rows (Hewitt 2021). A piece-
      based output row gives a new token about the logits of its pieces, so before training it
      takes probability from them wherever they are likely: measured in
      ``benchmarks/vocab_transfer.py`` (SmolLM2, tied, 20,000 tokens: held-out Chinese
      4.79 -> 7.39 bits/char with sub-word-mean rows in a tied matrix).
    * ``"normal"``: i.i.d. ``N(0, initializer_range**2)`` (the model config's value, 0.02 if
      absent), drawn from ``generator``.

    Tied embeddings stay one matrix, initialised by ``init`` (``head_init`` must be ``None`` or
    the same), unless ``untie=True``: then the lm_head gets its own copy of the old matrix
    (``config.tie_word_embeddings`` becomes ``False``, so ``save_pretrained`` writes both and
    a stock ``from_pretrained`` loads them untied) and its new rows follow ``head_init``. Means
    are computed in fp32 and cast to the weight dtype. ``model.config.vocab_size`` is updated.

    Args:
        model: a transformers model (``get_input_embeddings``/``get_output_embeddings``).
        old_tokenizer: the tokenizer the model was trained with (SentencePiece model or HF
            fast tokenizer, e.g. a byte-level BPE directory).
        new_tokenizer: the extended tokenizer (same kinds, a ``MergeResult`` or a
            ``BPEExtension``).
        init: the input rows' strategy.
        head_init: the lm_head rows' strategy, or ``None`` (``"mean"``).
        untie: give a tied model its own lm_head first (ignored when already untied).
        generator: random source for ``"normal"`` (CPU generator).

    Returns:
        ``torch.int64`` tensor of the new row ids, shape ``(len(new) - len(old),)``.

    Raises:
        ValueError: the model's embedding rows != ``len(old_tokenizer)``;
            ``new_tokenizer`` does not extend ``old_tokenizer``; ``init`` or ``head_init`` is
            unknown; ``head_init`` differs from ``init`` on tied embeddings without ``untie``.

    Example:
        >>> new_ids = resize_embeddings(model, "llama2.model", merged, untie=True)
        >>> model.get_input_embeddings().weight.shape  # (len(merged.proto.pieces), hidden)
    """
    out0 = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shared = out0 is not None and out0.weight is model.get_input_embeddings().weight
    if init is None:
        init = DEFAULT_TIED_INIT if shared and not untie else DEFAULT_INIT
    init_s = _normal_std(get_row_init(init, "init"), model)
    head_s = None if head_init is None else _normal_std(get_row_init(head_init, "head_init"), model)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(untie, bool):
        raise TypeError(f"untie must be a bool, got untie={untie!r}")
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
    check_extends(old, new)
    tied = out is not None and out.weight is inp.weight
    if tied and not untie and head_s not in (None, init_s):
        raise ValueError(
            f"head_init={head_init!r} differs from init={init!r}, but the model ties its "
            "input embeddings and lm_head (one matrix); leave head_init=None or pass untie=True"
        )
    if head_s is None:
        head_s = init_s if tied and not untie else ROW_INITS[DEFAULT_HEAD_INIT]
    if tied and untie:
        untie_embeddings(model)
        out = model.get_output_embeddings()
        tied = False

    pieces = _new_row_sources(old, new) if init_s.uses_pieces or head_s.uses_pieces else None
    blank: list[list[int] | None] = [None] * (n_new - n_old)
    inp_new = _grow(inp.weight, init_s.rows(inp.weight, pieces or blank, generator=generator))
    inp.weight = torch.nn.Parameter(inp_new, requires_grad=inp.weight.requires_grad)
    inp.num_embeddings = n_new
    if out is not None:
        if tied:
            out.weight = inp.weight
        else:
            head_rows = head_s.rows(out.weight, pieces or blank, generator=generator)
            out.weight = torch.nn.Parameter(
                _grow(out.weight, head_rows), requires_grad=out.weight.requires_grad
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


def check_extends(old: Any, new: Any) -> None:
    """Raise ``ValueError`` unless tokenizer view ``new`` keeps every piece of ``old`` at its id."""
    n_old, n_new = len(old), len(new)
    if n_new < n_old or new.pieces[:n_old] != old.pieces:
        bad = next((i for i in range(min(n_old, n_new)) if new.pieces[i] != old.pieces[i]), n_new)
        got = new.pieces[bad] if bad < n_new else "<missing>"
        want = old.pieces[bad] if bad < n_old else "<missing>"
        raise ValueError(
            f"new_tokenizer must extend old_tokenizer (same pieces at ids 0..{n_old - 1}); "
            f"id {bad} is {got!r} in new_tokenizer but {want!r} in old_tokenizer"
        )


def untie_embeddings(model: Any) -> bool:
    """Give a tied ``model`` an lm_head of its own (a copy of the shared matrix).

    Sets ``config.tie_word_embeddings = False`` (and the text sub-config's, where there is
    one) so that transformers neither re-ties on load nor skips the lm_head on save.
    Returns whether anything changed (``False`` for an untied model).

    Example:
        >>> untie_embeddings(model)
        True
        >>> model.lm_head.weight is model.get_input_embeddings().weight
        False
    """
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if out is None or out.weight is not inp.weight:
        return False
    out.weight = torch.nn.Parameter(
        inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad
    )
    for cfg in (
        getattr(model, "config", None),
        getattr(getattr(model, "config", None), "text_config", None),
    ):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return True


def _normal_std(init: RowInit, model: Any) -> RowInit:
    """``NormalRows()`` draws with the model config's ``initializer_range`` (0.02 if absent)."""
    if isinstance(init, NormalRows) and init.std is None:
        std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
        return NormalRows(std)
    return init


def _new_row_sources(old: Any, new: Any) -> list[list[int] | None]:
    """For each new row, the old ids its text splits into (``None``: no text)."""
    n_old, n_new = len(old), len(new)
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


def _grow(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``weight`` (V_old, D) -> (V_old + K, D): old rows copied exactly, ``rows`` (K, D) cast."""
    old = weight.detach()
    grown = torch.empty(
        old.shape[0] + rows.shape[0], old.shape[1], dtype=old.dtype, device=old.device
    )
    grown[: old.shape[0]] = old
    grown[old.shape[0] :] = rows.to(device=old.device, dtype=old.dtype)
    return grown
