"""``share_output_rows``: lm_head rows for a vocabulary extension from counts, no gradient step.

A new token ``t`` is read by the base model as pieces ``a b c ...``; the base gives it
``p(a | h) * p(b c ... | h, a)``. One linear row cannot hold the second factor, but its average
is a count: of the places where an extended token starts with piece ``a`` in a corpus, the
share ``r_t`` where that token is ``t``. So the row of ``t`` is the row of ``a`` plus
``log r_t`` times a direction ``u`` along which every final hidden state has about the same
length (``h @ u ~= 1``: least squares over the model's own states on the corpus; RMS
normalisation makes such a direction exist), which adds ``log r_t`` to the logit: a bias the
stock Llama head does not have, written into its weights. The old row of ``a`` gets its own
share (``a`` standing alone) the same way, so the old byte pieces no longer keep the mass of
the characters the extended tokenizer now writes as one token; old rows that begin no new
token are untouched, so English keeps its logits.

Measured on SmolLM2-135M + 5,000 ``extend_bpe`` tokens (``docs/tokenizer.md``): held-out
Chinese 7.33 -> 6.68 bits per character before any training (base 4.77), English unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llamazh._checks import check_positive_float, check_positive_int, check_texts

__all__ = ["SPREAD_WARNING", "OutputShareReport", "byte_ends_fn", "share_output_rows", "share_rows"]

#: ``u_spread`` above which :func:`share_output_rows` warns (SmolLM2: 0.017)
SPREAD_WARNING = 0.25
SMOOTHING = 0.5  # defaults of share_output_rows, also what align_embeddings uses
FIT_TOKENS = 1024


@dataclass(frozen=True)
class OutputShareReport:
    """What :func:`share_output_rows` did.

    Attributes:
        counted_tokens: extended-tokenizer tokens counted in ``texts``.
        seen_new: new tokens that occur in ``texts`` (the others get the smoothed share).
        new_rows: new rows written.
        lowered_old_rows: old rows that begin a new token (their logit lowered by their share).
        u_spread: standard deviation of ``h @ u`` over the fitting states (0: a perfect bias).
    """

    counted_tokens: int
    seen_new: int
    new_rows: int
    lowered_old_rows: int
    u_spread: float


def byte_ends_fn(tokenizer: Any):
    """A function ``ids -> cumulative byte length after each token`` for byte-level BPE or
    SentencePiece pieces (so that two tokenizations of one text can be lined up)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in repr(
        backend.decoder or backend.pre_tokenizer
    )

    def piece_bytes(tok: str | None) -> int:
        if tok is None:
            return 0
        if byte_level:
            return len(tok)
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            return 1
        return len(tok.replace("\u2581", " ").encode("utf-8"))

    def ends(ids: list[int]) -> list[int]:
        out, n = [], 0
        for tok in tokenizer.convert_ids_to_tokens(ids):
            n += piece_bytes(tok)
            out.append(n)
        return out

    return ends


def _count_starts(
    old_tok: Any, new_tok: Any, olds: list[list[int]], news: list[list[int]]
) -> tuple[Counter, Counter, int]:
    """(occurrences of each extended token, extended-token starts per first base piece, total
    extended tokens counted) over the same texts encoded by both tokenizers. A token whose
    start is not a base boundary is skipped."""
    ends_old, ends_new = byte_ends_fn(old_tok), byte_ends_fn(new_tok)
    occurs: Counter = Counter()
    starts: Counter = Counter()
    total = 0
    for o, n in zip(olds, news):
        begin = dict(zip([0, *ends_old(o)[:-1]], o))  # byte offset -> base piece starting there
        for b, t in zip([0, *ends_new(n)[:-1]], n):
            a = begin.get(b)
            if a is not None:
                occurs[t] += 1
                starts[a] += 1
                total += 1
    return occurs, starts, total


@torch.no_grad()
def _constant_direction(
    model: nn.Module, ids: list[list[int]], fit_tokens: int
) -> tuple[Tensor, float]:
    """``u`` (D,) with ``h @ u ~= 1`` over the final hidden states ``h`` (the lm_head's input:
    the decoder's normalised output) of ``model`` reading ``ids`` (ridge least squares), and
    the spread of ``h @ u``. The decoder runs without the lm_head."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    device = model.get_output_embeddings().weight.device
    was_training = model.training
    model.eval()
    states: list[Tensor] = []
    try:
        n = 0
        for seq in ids:
            if n >= fit_tokens:
                break
            seq = seq[: max(2, fit_tokens - n)]
            h = decoder(input_ids=torch.tensor([seq], device=device), use_cache=False)
            states.append(h.last_hidden_state[0].float())
            n += len(seq)
    finally:
        model.train(was_training)
    if not states:
        raise ValueError("texts must hold a text of at least two old-tokenizer tokens")
    H = torch.cat(states)  # (N, D)
    ridge = 1e-3 * float(H.pow(2).sum(-1).mean())
    gram = H.T @ H + ridge * torch.eye(H.shape[1], device=H.device)
    u = torch.linalg.solve(gram, H.T @ torch.ones(H.shape[0], device=H.device))
    return u, float((H @ u).std()) if H.shape[0] > 1 else 0.0


def share_output_rows(
    model: nn.Module,
    old_tokenizer: Any,
    new_tokenizer: Any,
    texts: Sequence[str],
    *,
    smoothing: float = SMOOTHING,
    fit_tokens: int = FIT_TOKENS,
) -> OutputShareReport:
    """Set the lm_head rows of a vocabulary extension from counts in ``texts`` (no gradient).

    For each new token ``t`` whose first base piece is ``a``: row ``t`` = row ``a`` +
    ``log r_t * u``, with ``r_t = (n_t + s) / (n_a + s * (k_a + 1))``: ``n_t`` occurrences of
    ``t`` in ``texts`` (extended tokenizer), ``n_a`` extended tokens that start with piece
    ``a``, ``k_a`` new tokens that start with ``a``, ``s`` = ``smoothing``. Old rows that begin
    a new token get ``log r_a * u`` added (``r_a``: the share of ``a`` standing alone). ``u``
    (D,) satisfies ``h @ u ~= 1`` for the lm_head inputs ``h`` of ``model`` reading ``texts``
    in old tokens. Rows are computed first and written together.

    Args:
        model: a causal LM resized to ``new_tokenizer`` (``resize_embeddings(...,
            untie=True)``): the lm_head must be its own matrix, and its rows up to
            ``len(old_tokenizer)`` the base's.
        old_tokenizer, new_tokenizer: Hugging Face tokenizers; ``new`` extends ``old``.
        texts: text in the language of the extension (strings; a few thousand lines suffice).
        smoothing: added to every count (> 0): tokens never seen get a small share.
        fit_tokens: old-tokenizer tokens the model reads to fit ``u`` (>= 16).

    Returns:
        An :class:`OutputShareReport`.

    Raises:
        ValueError: tied embeddings (the row is also the input row: resize with
            ``untie=True``); tokenizers and rows that do not match; ``texts`` empty or without
            a new token.
        TypeError: ``texts`` is a single string, or holds something that is not a ``str``.

    Example:
        >>> resize_embeddings(model, old_tok, new_tok, untie=True)
        >>> share_output_rows(model, old_tok, new_tok, zh_lines)
        OutputShareReport(counted_tokens=..., seen_new=..., ...)
    """
    from llamazh.tokenizer._sources import as_view
    from llamazh.tokenizer.resize import check_extends

    texts = check_texts("texts", texts)
    smoothing = check_positive_float("smoothing", smoothing)
    check_positive_int("fit_tokens", fit_tokens, minimum=16)
    old, new = as_view(old_tokenizer, "old_tokenizer"), as_view(new_tokenizer, "new_tokenizer")
    check_extends(old, new)
    n_old, n_new = len(old), len(new)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is inp.weight:
        raise ValueError(
            "model's lm_head is tied to its embedding: an output row would also move the input "
            "row; resize with resize_embeddings(..., untie=True) first"
        )
    if out.weight.shape[0] != n_new:
        raise ValueError(
            f"model's lm_head has {out.weight.shape[0]} rows but new_tokenizer has {n_new} "
            "tokens; resize it first (llamazh.tokenizer.resize_embeddings)"
        )
    if n_new == n_old:
        raise ValueError("new_tokenizer adds no token to old_tokenizer: there is nothing to set")

    new_rows, lowered, old_rows, report = share_rows(model, old_tokenizer, new_tokenizer, texts,
                                                     n_old, smoothing, fit_tokens)  # fmt: skip
    with torch.no_grad():
        out.weight[n_old:] = new_rows.to(out.weight.dtype)
        out.weight[lowered] = old_rows.to(out.weight.dtype)
    return report


def share_rows(
    model: nn.Module,
    old_tokenizer: Any,
    new_tokenizer: Any,
    texts: list[str],
    n_old: int,
    smoothing: float = SMOOTHING,
    fit_tokens: int = FIT_TOKENS,
    original: Tensor | None = None,
    encoded: tuple[list[list[int]], list[list[int]]] | None = None,
) -> tuple[Tensor, Tensor, Tensor, OutputShareReport]:
    """The rows :func:`share_output_rows` writes, without writing them: ``(new rows (K, D),
    lowered old ids (J,), their rows (J, D), report)`` (fp32, on the lm_head's device).
    ``original`` (V_old, D): the old rows to start from (default: ``model``'s own; the base's
    make a second call give the same rows instead of lowering them twice). ``encoded``:
    ``texts`` already encoded by (old, new) tokenizer, without special tokens."""
    from llamazh.tokenizer._sources import as_view, piece_splitter

    n_new = len(new_tokenizer)
    if encoded is None:
        encoded = (
            old_tokenizer(texts, add_special_tokens=False).input_ids,
            new_tokenizer(texts, add_special_tokens=False).input_ids,
        )
    old_ids, new_ids = encoded
    occurs, starts, total = _count_starts(old_tokenizer, new_tokenizer, old_ids, new_ids)
    seen_new = sum(1 for t in occurs if t >= n_old)
    if not seen_new:
        raise ValueError(
            f"texts contain none of the {n_new - n_old:,} new tokens of new_tokenizer (ids "
            f"{n_old}..{n_new - 1}); give text in the language the extension was made for"
        )
    split = piece_splitter(as_view(old_tokenizer, "old_tokenizer"))
    tokens = new_tokenizer.convert_ids_to_tokens(list(range(n_old, n_new)))
    w = model.get_output_embeddings().weight.detach()
    src = w[:n_old] if original is None else original.detach().to(w.device)
    firsts = []  # (new id, its first old piece); tokens without old pieces keep their rows
    for k, tok in enumerate(tokens):
        pieces = split(tok) if tok else []
        if pieces and pieces[0] < n_old:
            firsts.append((n_old + k, pieces[0]))
    children = Counter(a for _, a in firsts)

    def log_share(t: int, a: int) -> float:
        return math.log((occurs[t] + smoothing) / (starts[a] + smoothing * (children[a] + 1)))

    u, spread = _constant_direction(model, [ids for ids in old_ids if len(ids) > 1], fit_tokens)
    if spread > SPREAD_WARNING:
        warnings.warn(
            f"the model's final hidden states have no direction of constant length (h @ u "
            f"varies by {spread:.2f} around 1): the token shares act as biases only roughly",
            stacklevel=3,
        )
    u = u.to(w.device)
    new_rows = w[n_old:].float().clone()
    if firsts:
        ids = torch.tensor([t - n_old for t, _ in firsts], device=w.device)
        a = torch.tensor([a for _, a in firsts], device=w.device)
        share = torch.tensor([log_share(t, a) for t, a in firsts], device=w.device)
        new_rows[ids] = src[a].float() + share[:, None] * u
    lowered = torch.tensor(sorted(children), dtype=torch.long, device=w.device)
    old_share = torch.tensor([log_share(a, a) for a in lowered.tolist()], device=w.device)
    old_rows = src[lowered].float() + old_share[:, None] * u
    report = OutputShareReport(
        counted_tokens=total,
        seen_new=seen_new,
        new_rows=len(firsts),
        lowered_old_rows=len(lowered),
        u_spread=round(spread, 5),
    )
    return new_rows, lowered, old_rows, report
