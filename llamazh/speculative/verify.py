"""The verification step of speculative decoding, as pure functions on tensors.

Sampled path (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192; Chen et al. 2023,
https://arxiv.org/abs/2302.01318): drafted token ``x_i`` drawn from ``q_i`` is accepted with
probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection the next token is drawn from
``norm(max(0, p_i - q_i))``; when all ``k`` are accepted a bonus token is drawn from ``p_k``.
The emitted tokens are then distributed exactly as ``k + 1`` (or fewer) tokens sampled from the
target one at a time.

Greedy path: accept while the drafted token equals the target's argmax; the next token is the
target's argmax at the first disagreement (or after the last draft). The result is the target's
own greedy output, token for token.

Shapes: ``B`` rows, ``k`` drafted tokens, ``V`` vocabulary. ``target_*[:, j]`` is the target's
distribution for the token after ``context + draft[:, :j]``, so it has ``k + 1`` positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from llamazh.sampling import sample_from


class Verdict(NamedTuple):
    """Outcome of one verification step, per row."""

    num_accepted: Tensor  # (B,) int64 in [0, k]: drafted tokens accepted
    next_token: Tensor  # (B,) int64: the token emitted after the accepted ones


def _check_shapes(target: Tensor, draft_tokens: Tensor, name: str) -> tuple[int, int]:
    if target.dim() != 3 or draft_tokens.dim() != 2:
        raise ValueError(
            f"{name} must be (B, k + 1, V) and draft_tokens (B, k); got {name} "
            f"{tuple(target.shape)} and draft_tokens {tuple(draft_tokens.shape)}"
        )
    b, k = draft_tokens.shape
    if target.shape[0] != b or target.shape[1] != k + 1:
        raise ValueError(
            f"{name} must have shape (B, k + 1, V) = ({b}, {k + 1}, V) for draft_tokens of "
            f"shape {tuple(draft_tokens.shape)}; got {tuple(target.shape)}"
        )
    return b, k


def _leading_accepted(accept: Tensor) -> Tensor:
    """``(B, k)`` bool -> ``(B,)`` int64: length of the all-True prefix of each row."""
    return accept.to(torch.int64).cumprod(dim=1).sum(dim=1)


def verify_greedy(target_logits: Tensor, draft_tokens: Tensor) -> Verdict:
    """Greedy verification: accept drafts while they equal the target's argmax.

    Args:
        target_logits: ``(B, k + 1, V)`` processed target logits (any float dtype).
        draft_tokens: ``(B, k)`` int64, ``k >= 0``.

    Returns:
        :class:`Verdict`; ``next_token`` is the target's argmax after the accepted drafts.

    Raises:
        ValueError: on inconsistent shapes.

    Example:
        >>> v = verify_greedy(torch.eye(4)[[1, 2, 0]].unsqueeze(0), torch.tensor([[1, 3]]))
        >>> v.num_accepted.tolist(), v.next_token.tolist()
        ([1], [2])
    """
    _check_shapes(target_logits, draft_tokens, "target_logits")
    choice = target_logits.argmax(dim=-1)  # (B, k + 1)
    n = _leading_accepted(choice[:, :-1] == draft_tokens)
    return Verdict(n, choice.gather(1, n.unsqueeze(1)).squeeze(1))


def verify_sampled(
    target_probs: Tensor,
    draft_probs: Tensor | None,
    draft_tokens: Tensor,
    *,
    generator: torch.Generator | None,
) -> Verdict:
    """Exact speculative sampling: the emitted tokens are distributed as the target's samples.

    Args:
        target_probs: ``(B, k + 1, V)`` target probabilities (after temperature/top-k/top-p).
        draft_probs: ``(B, k, V)`` the distributions the drafts were drawn from, same warping;
            ``None`` for a deterministic drafter (each draft is a point mass, q(x) = 1).
        draft_tokens: ``(B, k)`` int64, ``k >= 0``.
        generator: the only source of randomness (``k`` uniforms, then one categorical draw per
            row).

    Returns:
        :class:`Verdict`.

    Raises:
        ValueError: on inconsistent shapes.

    Example:
        >>> p = torch.full((1, 3, 5), 0.2); q = torch.full((1, 2, 5), 0.2)
        >>> g = torch.Generator().manual_seed(0)
        >>> verify_sampled(p, q, torch.tensor([[3, 1]]), generator=g).num_accepted.tolist()
        [2]
    """
    b, k = _check_shapes(target_probs, draft_tokens, "target_probs")
    if draft_probs is not None and draft_probs.shape != (b, k, target_probs.shape[-1]):
        raise ValueError(
            f"draft_probs must have shape (B, k, V) = {(b, k, target_probs.shape[-1])}; got "
            f"{tuple(draft_probs.shape)} (a draft with another vocabulary?)"
        )
    p = target_probs.float()
    index = draft_tokens.unsqueeze(-1)  # (B, k, 1)
    p_x = p[:, :k].gather(2, index).squeeze(-1)  # (B, k)
    if draft_probs is None:
        q_x = torch.ones_like(p_x)
    else:
        q_x = draft_probs.float().gather(2, index).squeeze(-1)
    u = torch.rand(b, k, generator=generator, device=p.device)
    # u < p/q with probability min(1, p/q); written as a product so q = 0 cannot divide.
    n = _leading_accepted(u * q_x < p_x)  # (B,)

    p_n = p.gather(1, n.view(b, 1, 1).expand(b, 1, p.shape[-1])).squeeze(1)  # (B, V)
    rejected = n < k
    if k and bool(rejected.any()):
        n_safe = n.clamp(max=k - 1).view(b, 1, 1).expand(b, 1, p.shape[-1])
        if draft_probs is None:
            q_n = torch.zeros_like(p_n).scatter_(1, draft_tokens.gather(1, n_safe[:, 0, :1]), 1.0)
        else:
            q_n = draft_probs.float().gather(1, n_safe).squeeze(1)  # (B, V)
        residual = (p_n - q_n).clamp(min=0.0)
        mass = residual.sum(dim=-1, keepdim=True)
        # mass == 0 needs p == q up to rounding, where rejection has probability ~0; fall back
        # to p rather than dividing by zero.
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_n)
        p_n = torch.where(rejected.unsqueeze(1), residual, p_n)
    return Verdict(n, sample_from(p_n, generator))
