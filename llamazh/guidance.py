"""Classifier-free guidance (Sanchez et al. 2023, https://arxiv.org/abs/2306.17806) as a
logits processor.

``out = g * (log_softmax(cond) - log_softmax(uncond)) + log_softmax(uncond)``, the semantics of
transformers' ``guidance_scale`` / ``negative_prompt_ids`` (``UnbatchedClassifierFreeGuidance
LogitsProcessor``): the unconditional branch reads the negative prompt (default: the prompt's
last token) followed by the tokens generated so far, through the same model with its own KV
cache.

Unlike transformers' processor, which appends ``input_ids[:, -1]`` on every call and so assumes
it sees each step exactly once, this one derives its state from ``input_ids`` alone: the tokens
after the prompt are compared with what its cache holds, the cache is cropped to their common
prefix and only the difference is run. Rolled-back (rejected) speculative drafts, repeated
calls for the same position and calls for several drafted positions therefore all give the
guided scores of exactly the sequence passed in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llamazh.integrations.hf_cache import cache_kwargs, crop_cache, new_dynamic_cache
from llamazh.speculative.drafters import common_prefix_length

_KEEP_BEHIND = 64  # unconditional log-probs kept for positions this far behind the newest call


class ClassifierFreeGuidance:
    """Logits processor ``(input_ids (B, L), scores (B, V)) -> guided log-probs (B, V)``.

    Usable as ``model.generate(..., logits_processor=LogitsProcessorList([cfg]))`` and as
    ``speculative_generate(..., logits_processor=[cfg])`` (where :meth:`prefetch` runs the
    unconditional branch once for all drafted positions). Note that ``model.generate`` runs a
    custom processor after its temperature/top-k/top-p warpers (its own ``guidance_scale``
    runs before them), so with sampling the two differ; ``speculative_generate`` applies it
    first, as ``guidance_scale`` does. One instance serves one prompt: the
    first call fixes the prompt length; call :meth:`reset` before reusing it for another.

    Args:
        guidance_scale: ``g``; 1 returns the log-softmax of the scores unchanged, > 1 follows
            the prompt more closely, < 1 pushes towards the negative prompt.
        model: the model computing the unconditional scores (normally the target itself).
        negative_prompt_ids: ``(B, S)`` int64 ids of the unconditional branch's prompt, or
            ``None`` for the prompt's last token.
        negative_prompt_attention_mask: ``(B, S)`` 0/1 (left padding), default all ones.

    Raises:
        TypeError/ValueError: for a non-finite scale, mis-shaped ids or mask, or a call whose
            ``input_ids`` do not extend the prompt seen first.

    Example:
        >>> cfg = ClassifierFreeGuidance(1.5, model, negative_prompt_ids=neg_ids)
        >>> out = model.generate(ids, logits_processor=LogitsProcessorList([cfg]))
    """

    def __init__(
        self,
        guidance_scale: float,
        model: Any,
        negative_prompt_ids: Tensor | None = None,
        negative_prompt_attention_mask: Tensor | None = None,
    ) -> None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale must be a number, got {guidance_scale!r}")
        if not torch.isfinite(torch.tensor(float(guidance_scale))):
            raise ValueError(f"guidance_scale must be finite, got guidance_scale={guidance_scale}")
        if negative_prompt_ids is not None:
            if negative_prompt_ids.dim() != 2 or negative_prompt_ids.shape[1] == 0:
                raise ValueError(
                    "negative_prompt_ids must be (B, S) with S >= 1, got shape "
                    f"{tuple(negative_prompt_ids.shape)}"
                )
            if (
                negative_prompt_attention_mask is not None
                and negative_prompt_attention_mask.shape != negative_prompt_ids.shape
            ):
                raise ValueError(
                    "negative_prompt_attention_mask must have the shape of negative_prompt_ids "
                    f"{tuple(negative_prompt_ids.shape)}, got "
                    f"{tuple(negative_prompt_attention_mask.shape)}"
                )
        elif negative_prompt_attention_mask is not None:
            raise ValueError("negative_prompt_attention_mask given without negative_prompt_ids")
        self.guidance_scale = float(guidance_scale)
        self.model = model
        self.negative_prompt_ids = negative_prompt_ids
        self.negative_prompt_attention_mask = negative_prompt_attention_mask
        self.reset()

    def reset(self) -> None:
        """Forget the prompt and the unconditional cache."""
        self._prompt: Tensor | None = None  # (B, P) the conditional prompt seen first
        self._cache: Any = None
        self._fed: Tensor | None = None  # (B, n) generated tokens the cache holds after the base
        self._mask: Tensor | None = None  # (B, S) attention mask of the base (negative prompt)
        self._logprobs: dict[int, Tensor] = {}  # t -> (B, V) after base + generated[:, :t]
        self.forward_calls = 0

    # ---- the unconditional branch --------------------------------------------------------

    def _run(self, ids: Tensor) -> Tensor:
        """Feed ``ids`` ``(B, m)`` after the cached positions -> log-probs ``(B, m, V)``."""
        if self._mask is None or self._fed is None:
            raise RuntimeError(
                "ClassifierFreeGuidance._run called before the processor saw its prompt: call "
                "the processor (or prefetch after a first call) so that _start runs first"
            )
        base_len = self._mask.shape[1]
        done = base_len + self._fed.shape[1]
        mask = torch.cat(
            [self._mask, self._mask.new_ones(ids.shape[0], done - base_len + ids.shape[1])], dim=1
        )
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, done:]  # (B, m)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **self._feed_cache,
        )
        self.forward_calls += 1
        return torch.nn.functional.log_softmax(out.logits.float(), dim=-1)

    def _start(self, input_ids: Tensor) -> None:
        base = self.negative_prompt_ids
        if base is None:
            base = input_ids[:, -1:]
        elif base.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"negative_prompt_ids has batch {base.shape[0]}, input_ids has batch "
                f"{input_ids.shape[0]}; they must match"
            )
        base = base.to(input_ids.device)
        mask = self.negative_prompt_attention_mask
        self._mask = (torch.ones_like(base) if mask is None else mask.to(base.device)).long()
        self._cache = new_dynamic_cache(self.model)
        self._feed_cache = cache_kwargs(self.model, self._cache)  # once per cache, not per call
        self._fed = base[:, :0]
        positions = (self._mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, S)
        out = self.model(
            input_ids=base,
            attention_mask=self._mask,
            position_ids=positions,
            **self._feed_cache,
        )
        self.forward_calls += 1
        self._logprobs = {0: torch.nn.functional.log_softmax(out.logits[:, -1].float(), dim=-1)}
        self._prompt = input_ids.clone()  # last: a failed forward leaves the processor unstarted

    def _sync(self, input_ids: Tensor) -> int:
        """Make the cache agree with ``input_ids``; return t, the number of generated tokens."""
        if self._prompt is None:
            self._start(input_ids)
        if self._prompt is None or self._fed is None or self._mask is None:
            raise RuntimeError(
                "ClassifierFreeGuidance state is incomplete (an earlier call failed part-way?); "
                "call reset() before using the processor again"
            )
        p = self._prompt.shape[1]
        if (
            input_ids.shape[0] != self._prompt.shape[0]
            or input_ids.shape[1] < p
            or not bool((input_ids[:, :p] == self._prompt).all())
        ):
            raise ValueError(
                "ClassifierFreeGuidance: input_ids do not start with the prompt this processor "
                f"was first called with (batch {self._prompt.shape[0]}, length {p}); call "
                "reset() or make a new processor for a new prompt"
            )
        generated = input_ids[:, p:]  # (B, t)
        t = generated.shape[1]
        fed = self._fed.shape[1]
        common = min(
            common_prefix_length(self._fed[r], generated[r]) for r in range(len(generated))
        )
        if common < min(fed, t):  # the sequence diverged from the cache: roll back
            fed = common
            crop_cache(self._cache, self._mask.shape[1] + common)
            self._fed = self._fed[:, :common]
            self._logprobs = {j: v for j, v in self._logprobs.items() if j <= common}
        # a shorter prefix of what the cache holds (a drafted position) is served as is
        if t not in self._logprobs:
            if t <= fed:  # dropped from the window: recompute the last position
                crop_cache(self._cache, self._mask.shape[1] + t - 1)
                self._fed = self._fed[:, : t - 1]
                self._logprobs = {j: v for j, v in self._logprobs.items() if j < t}
            n = self._fed.shape[1]
            logprobs = self._run(generated[:, n:t])  # (B, t - n, V)
            self._fed = generated[:, :t].clone()
            for j in range(n + 1, t + 1):
                self._logprobs[j] = logprobs[:, j - n - 1]
        for j in [j for j in self._logprobs if 0 < j < t - _KEEP_BEHIND]:
            del self._logprobs[j]
        return t

    # ---- processor interface -------------------------------------------------------------

    def prefetch(self, input_ids: Tensor) -> None:
        """Run the unconditional branch over all of ``input_ids`` at once, so that calls for any
        prefix of it (drafted positions) are served without further forwards. Before the first
        ``__call__`` (which fixes the prompt) it does nothing."""
        if self._prompt is not None:
            self._sync(input_ids)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = torch.nn.functional.log_softmax(scores, dim=-1)
        if self.guidance_scale == 1:
            return scores
        t = self._sync(input_ids)  # rebinds self._logprobs: look it up afterwards
        uncond = self._logprobs[t].to(scores.dtype)
        return self.guidance_scale * (scores - uncond) + uncond
