"""Drafters: whatever proposes the tokens the target then verifies.

A drafter is anything with a ``draft`` method of the :class:`Drafter` signature. Two ship here:
:class:`ModelDrafter` (a smaller causal LM with the same vocabulary, keeping its own KV cache)
and :class:`PromptLookupDrafter` (copies what followed the latest earlier occurrence of the
context's last n-gram; Saxena 2023, https://github.com/apoorvumang/prompt-lookup-decoding).

Drafters are stateless from the caller's point of view: each call receives the full current
sequence, and a drafter with a cache reconciles it with that sequence itself (keeping the
longest common prefix), so rejected drafts are rolled back without any extra protocol.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from llamazh._checks import check_positive_int
from llamazh.integrations.hf_cache import (
    accepts_logits_to_keep,
    cache_kwargs,
    check_rollback_cache,
    crop_cache,
    new_dynamic_cache,
    output_vocab_size,
)
from llamazh.sampling import SamplingConfig, token_presence


class Draft(NamedTuple):
    """Proposed continuation of one sequence."""

    tokens: Tensor  # (1, k') int64, k' <= the number asked for (may be 0)
    probs: (
        Tensor | None
    )  # (1, k', V) fp32 distributions the tokens were drawn from; None = point masses


@runtime_checkable
class Drafter(Protocol):
    """Proposes up to ``num_tokens`` tokens that continue ``input_ids`` ``(1, L)``.

    ``sampling`` says how the target chooses tokens: a drafter that samples must draw from
    ``sampling``-warped distributions using ``generator`` and return them in ``Draft.probs``;
    a deterministic drafter returns ``probs=None``.
    """

    def draft(
        self,
        input_ids: Tensor,
        num_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft: ...


def check_one_sequence(drafter: object, input_ids: Tensor) -> None:
    """Raise ``ValueError`` unless ``input_ids`` is one sequence ``(1, L)``."""
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"{type(drafter).__name__} drafts one sequence; got batch {input_ids.shape[0]}"
        )


def common_prefix_length(a: Tensor, b: Tensor) -> int:
    """Length of the longest common prefix of two 1-D tensors."""
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if differ.numel() else n


class ModelDrafter:
    """A draft causal LM (same tokenizer as the target) with its own rolled-back KV cache.

    Args:
        model: a transformers causal LM (``model(input_ids, cache=..., use_cache=True)``
            returning ``.logits``) in eval mode.
        past_key_values: the cache to use (``None``: a new ``DynamicCache``); it must be
            croppable, and it is owned by the drafter from then on.

    Raises:
        ValueError: for a cache that cannot be rolled back.

    Example:
        >>> drafter = ModelDrafter(small_model)
        >>> out = speculative_generate(big_model, drafter, ids, max_new_tokens=64)
    """

    def __init__(self, model: Any, *, past_key_values: Any = None) -> None:
        self.model = model
        self.vocab_size = output_vocab_size(model)
        self._cache = (
            new_dynamic_cache(model)
            if past_key_values is None
            else check_rollback_cache(past_key_values, "draft past_key_values")
        )
        self._tokens = torch.empty(0, dtype=torch.long)  # what the cache holds, in order
        self._keep_arg = accepts_logits_to_keep(model)
        self._feed_cache = cache_kwargs(model, self._cache)  # the cache object never changes
        self.forward_calls = 0

    def reset(self) -> None:
        """Forget the cached context (the next call re-encodes its whole input)."""
        crop_cache(self._cache, 0)
        self._tokens = self._tokens[:0]

    def _feed(self, ids: Tensor) -> Tensor:
        """Run ``ids`` ``(1, m)`` after the cached positions -> logits of the last ``(1, V)``."""
        kwargs = {"logits_to_keep": 1} if self._keep_arg else {}
        out = self.model(input_ids=ids, **self._feed_cache, **kwargs)
        self.forward_calls += 1
        self._tokens = torch.cat([self._tokens, ids[0]])
        return out.logits[:, -1]

    def draft(
        self,
        input_ids: Tensor,
        num_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        check_one_sequence(self, input_ids)
        seq = input_ids[0]
        if self._tokens.device != seq.device:
            self._tokens = self._tokens.to(seq.device)
        # Keep the longest prefix the cache shares with the sequence, but re-feed at least the
        # last token: its logits are the first draft distribution.
        keep = min(common_prefix_length(self._tokens, seq), seq.shape[0] - 1)
        crop_cache(self._cache, keep)
        self._tokens = self._tokens[:keep]
        logits = self._feed(input_ids[:, keep:])

        need_presence = sampling.repetition_penalty not in (None, 1.0)
        presence = token_presence(input_ids, logits.shape[-1]) if need_presence else None
        tokens: list[Tensor] = []
        probs: list[Tensor] = []
        for i in range(num_tokens):
            token, prob = sampling.choose(logits, presence, generator)  # (1,), (1, V) | None
            tokens.append(token)
            if prob is not None:
                probs.append(prob)
            if presence is not None:
                presence[0, token] = True
            if i + 1 < num_tokens:
                logits = self._feed(token.view(1, 1))
        if not tokens:
            return Draft(input_ids.new_empty(1, 0), None)
        stacked = torch.stack(tokens, dim=1)  # (1, k)
        return Draft(stacked, torch.stack(probs, dim=1) if probs else None)


class PromptLookupDrafter:
    """Drafts by copying: find the latest earlier occurrence of the context's last n-gram
    (``max_ngram_size`` down to ``min_ngram_size``) and propose the tokens that followed it.

    The copy may run past the end of the context into the tokens it has just proposed, so a
    repeating pattern is extended for as many tokens as asked. Deterministic (``probs=None``),
    so it is exact with sampling too: acceptance is then ``p(x)``.

    Args:
        max_ngram_size: longest suffix to match (>= min_ngram_size).
        min_ngram_size: shortest suffix to match (>= 1).

    Example:
        >>> out = speculative_generate(model, PromptLookupDrafter(), ids, max_new_tokens=64)
    """

    def __init__(self, max_ngram_size: int = 3, min_ngram_size: int = 1) -> None:
        check_positive_int("max_ngram_size", max_ngram_size)
        check_positive_int("min_ngram_size", min_ngram_size)
        if min_ngram_size > max_ngram_size:
            raise ValueError(
                f"min_ngram_size must be <= max_ngram_size, got min_ngram_size={min_ngram_size}"
                f", max_ngram_size={max_ngram_size}"
            )
        self.max_ngram_size = max_ngram_size
        self.min_ngram_size = min_ngram_size

    def draft(
        self,
        input_ids: Tensor,
        num_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        check_one_sequence(self, input_ids)
        seq = input_ids[0]
        length = seq.shape[0]
        for n in range(min(self.max_ngram_size, length - 1), self.min_ngram_size - 1, -1):
            # windows starting at 0 .. length - n - 1 (the suffix itself excluded)
            windows = seq[: length - 1].unfold(0, n, 1)  # (length - n, n)
            hits = (windows == seq[length - n :]).all(dim=1).nonzero()
            if hits.numel() == 0:
                continue
            start = int(hits[-1, 0]) + n  # first copied position, < length
            period = length - start
            # position start + j for j >= period lies in the drafted part: copy with that period
            idx = start + torch.arange(num_tokens, device=seq.device) % period
            return Draft(seq[idx].unsqueeze(0), None)
        return Draft(input_ids.new_empty(1, 0), None)
