"""Pure sampling functions: logits -> processed logits -> probabilities -> tokens.

Every function works on ``(..., V)`` tensors (any leading shape) and follows the semantics of
transformers' logits processors of the same name, so that a distribution built here is the one
``model.generate(do_sample=True, ...)`` samples from:

* repetition penalty (CTRL, Keskar et al. 2019): a token already in the context has its logit
  divided by ``penalty`` if positive, multiplied if negative;
* temperature: ``logits / temperature``;
* top-k: keep the ``k`` largest logits (ties at the boundary are kept);
* top-p (nucleus): drop the smallest logits whose cumulative probability is ``<= 1 - top_p``,
  always keeping the most likely token.

Randomness comes only from an explicit ``torch.Generator``; nothing reads global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llamazh._checks import check_positive_float, check_positive_int


def apply_repetition_penalty(logits: Tensor, presence: Tensor, penalty: float) -> Tensor:
    """Penalise tokens present in the context (transformers' ``RepetitionPenaltyLogitsProcessor``).

    Args:
        logits: ``(..., V)`` float.
        presence: ``(..., V)`` bool (broadcastable), True where the token occurs in the context.
        penalty: > 0; 1.0 is a no-op, > 1 discourages repetition.

    Returns:
        ``(..., V)``, a new tensor.

    Example:
        >>> apply_repetition_penalty(torch.tensor([2.0, -2.0]), torch.tensor([True, True]), 2.0)
        tensor([ 1., -4.])
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(presence, penalised, logits)


def apply_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Keep the ``top_k`` largest logits of each row, set the rest to ``-inf``. ``(..., V)``."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering with transformers' convention (``TopPLogitsWarper``). ``(..., V)``.

    Sorted ascending, a token is dropped when the cumulative probability up to and including it
    is ``<= 1 - top_p``; the most likely token is always kept.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def token_presence(context_ids: Tensor, vocab_size: int) -> Tensor:
    """``(B, L)`` int64 token ids -> ``(B, V)`` bool, True where a token occurs in its row."""
    presence = torch.zeros(
        context_ids.shape[0], vocab_size, dtype=torch.bool, device=context_ids.device
    )
    if context_ids.shape[1]:
        presence.scatter_(1, context_ids, True)
    return presence


def block_presence(context_ids: Tensor, next_tokens: Tensor, vocab_size: int) -> Tensor:
    """Presence for the ``k + 1`` prefixes ``context``, ``context + t[:1]``, ... ``context + t``.

    Args:
        context_ids: ``(B, L)`` int64.
        next_tokens: ``(B, k)`` int64 tokens appended one by one.

    Returns:
        ``(B, k + 1, V)`` bool: row ``j`` is the presence of ``context + next_tokens[:, :j]``.
    """
    base = token_presence(context_ids, vocab_size)  # (B, V)
    b, k = next_tokens.shape
    seen = torch.zeros(b, k + 1, vocab_size, dtype=torch.int32, device=base.device)
    if k:
        one_hot = torch.zeros(b, k, vocab_size, dtype=torch.int32, device=base.device)
        one_hot.scatter_(2, next_tokens.unsqueeze(-1), 1)
        seen[:, 1:] = one_hot.cumsum(dim=1)  # (B, k, V): tokens[:j+1] for prefix j+1
    return base.unsqueeze(1) | (seen > 0)


def sample_from(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row of ``probs`` ``(..., V)`` -> ``(...)`` int64."""
    flat = probs.reshape(-1, probs.shape[-1])  # (N, V)
    tokens = torch.multinomial(flat, 1, generator=generator)  # (N, 1)
    return tokens.reshape(probs.shape[:-1])


@dataclass(frozen=True)
class SamplingConfig:
    """How a token is chosen from logits: greedy, or sampled after warping.

    Attributes:
        do_sample: False = argmax of the processed logits (temperature, top-k and top-p are
            ignored, as in transformers); True = sample from the warped distribution.
        temperature: > 0 (only used when sampling).
        top_k: keep the k most likely tokens (``None`` = all).
        top_p: nucleus mass in (0, 1] (``None`` or 1.0 = all).
        repetition_penalty: > 0; applied in greedy and sampling mode (``None`` = off).

    Raises:
        ValueError/TypeError: on out-of-range values, naming the field.

    Example:
        >>> cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=50)
        >>> probs = cfg.probs(torch.randn(1, 100))          # (1, 100), rows sum to 1
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got do_sample={self.do_sample!r}")
        if self.do_sample:
            check_positive_float("temperature", self.temperature)
        if self.top_k is not None:
            check_positive_int("top_k", self.top_k)
        if self.top_p is not None:
            top_p = check_positive_float("top_p", self.top_p)
            if top_p > 1.0:
                raise ValueError(f"top_p must be in (0, 1], got top_p={self.top_p}")
        if self.repetition_penalty is not None:
            check_positive_float("repetition_penalty", self.repetition_penalty)

    def process(self, logits: Tensor, presence: Tensor | None = None) -> Tensor:
        """Logits ``(..., V)`` -> processed fp32 logits (penalty, then warps when sampling).

        ``presence`` ``(..., V)`` bool is needed only with a repetition penalty.
        """
        out = logits.float()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            if presence is None:
                raise ValueError("repetition_penalty needs the context's token presence")
            out = apply_repetition_penalty(out, presence, self.repetition_penalty)
        if not self.do_sample:
            return out
        if self.temperature != 1.0:
            out = out / self.temperature
        if self.top_k is not None:
            out = apply_top_k(out, self.top_k)
        if self.top_p is not None and self.top_p < 1.0:
            out = apply_top_p(out, self.top_p)
        return out

    def probs(self, logits: Tensor, presence: Tensor | None = None) -> Tensor:
        """The sampling distribution ``(..., V)`` fp32 (``softmax`` of :meth:`process`)."""
        return self.process(logits, presence).softmax(dim=-1)

    def choose(
        self, logits: Tensor, presence: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        """Pick one token per row: ``(tokens (...), probs (..., V) or None when greedy)``."""
        processed = self.process(logits, presence)
        if not self.do_sample:
            return processed.argmax(dim=-1), None
        probs = processed.softmax(dim=-1)
        return sample_from(probs, generator), probs
