"""The speculative generation loop: draft, verify with one target forward, roll back, repeat.

Invariant: the target's cache holds every position of the sequence but the last; a step feeds
``[last token, d_1 .. d_k]`` (k + 1 positions, one forward), verifies, and crops the cache back to
the sequence minus its new last token. Drafters reconcile their own state with the sequence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llamazh._checks import check_choice, check_positive_int
from llamazh.integrations.hf_cache import (
    accepts_logits_to_keep,
    cache_kwargs,
    cache_length,
    check_rollback_cache,
    crop_cache,
    model_device,
    new_dynamic_cache,
    output_vocab_size,
)
from llamazh.integrations.hf_generation import resolve_generation
from llamazh.sampling import SamplingConfig, block_presence
from llamazh.speculative.drafters import Draft, Drafter, ModelDrafter
from llamazh.speculative.schedule import SCHEDULES, make_schedule
from llamazh.speculative.verify import verify_greedy, verify_sampled

LogitsProcessor = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SpeculativeOutput:
    """Result of :func:`speculative_generate`.

    ``sequences`` is ``(1, L + n)`` int64, prompt then the ``n`` new tokens (ending with the
    EOS token when one stopped generation), as ``model.generate`` returns it.
    """

    sequences: Tensor
    prompt_length: int
    steps: int = 0  # verification steps (target forwards after the prefill)
    target_forward_calls: int = 0  # steps + the prefill forward (if any)
    draft_forward_calls: int = 0  # forwards of a ModelDrafter's model (0 for other drafters)
    drafted: int = 0  # drafted tokens sent to verification
    accepted: int = 0  # of which accepted
    elapsed_s: float = 0.0
    draft_lengths: list[int] = field(default_factory=list)  # per step
    accepted_lengths: list[int] = field(default_factory=list)  # per step

    @property
    def new_tokens(self) -> Tensor:
        """``(1, n)`` the generated tokens."""
        return self.sequences[:, self.prompt_length :]

    @property
    def num_new_tokens(self) -> int:
        return self.sequences.shape[1] - self.prompt_length

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (nan when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Mean number of drafted tokens accepted per verification step."""
        return self.accepted / self.steps if self.steps else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Mean number of tokens emitted per target verification forward."""
        return self.num_new_tokens / self.steps if self.steps else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.num_new_tokens / self.elapsed_s if self.elapsed_s > 0 else float("nan")


def _as_drafter(draft: Any, vocab: int) -> Drafter:
    if isinstance(draft, torch.nn.Module):
        draft = ModelDrafter(draft)
    if not isinstance(draft, Drafter):
        raise TypeError(
            "draft must be a causal LM (torch.nn.Module) or a drafter with a draft(input_ids, "
            f"num_tokens, sampling, generator) method, got {type(draft).__name__}"
        )
    draft_vocab = getattr(draft, "vocab_size", None)
    if draft_vocab is not None and draft_vocab != vocab:
        raise ValueError(
            f"draft and target must share one vocabulary: draft logits have {draft_vocab} "
            f"entries, target logits {vocab}"
        )
    return draft


def _check_prompt(input_ids: Any, attention_mask: Tensor | None) -> Tensor:
    if not isinstance(input_ids, Tensor) or input_ids.dtype != torch.long or input_ids.dim() != 2:
        raise TypeError(
            "input_ids must be an int64 tensor of shape (1, L); got "
            f"{type(input_ids).__name__} {getattr(input_ids, 'dtype', '')} "
            f"{tuple(getattr(input_ids, 'shape', ()))}"
        )
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative_generate decodes one sequence (batch size 1); got batch size "
            f"{input_ids.shape[0]}: rows accept different numbers of drafts, so loop over them"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (shape (1, 0)); the prompt needs at least one token")
    if attention_mask is not None and not bool((attention_mask == 1).all()):
        raise ValueError("attention_mask must be all ones: padding is not supported (batch 1)")
    return input_ids


def _process(
    logits: Tensor,
    ids: Tensor,
    context_len: int,
    processors: Sequence[LogitsProcessor],
    sampling: SamplingConfig,
    eos_mask_until: int = 0,
    eos: Sequence[int] = (),
) -> Tensor:
    """Target logits ``(1, m, V)`` for prefixes ``ids[:, :context_len + j]`` -> processed fp32.

    The ``eos`` ids get -inf at prefixes shorter than ``eos_mask_until`` (``min_length``).
    """
    scores = logits.float()
    masked = min(max(eos_mask_until - context_len, 0), scores.shape[1])
    if masked and eos:
        scores = scores.clone()
        scores[:, :masked, list(eos)] = float("-inf")
    if processors:
        rows = []
        for j in range(scores.shape[1]):
            if j <= 1:  # before 0, and again once position 0 has shown the prompt
                for proc in processors:
                    if hasattr(proc, "prefetch"):  # e.g. CFG: all drafted positions at once
                        proc.prefetch(ids)
            row = scores[:, j]
            for proc in processors:
                row = proc(ids[:, : context_len + j], row)
            rows.append(row)
        scores = torch.stack(rows, dim=1)
    presence = None
    if sampling.repetition_penalty not in (None, 1.0):
        presence = block_presence(ids[:, :context_len], ids[:, context_len:], scores.shape[-1])
    return sampling.process(scores, presence)


@torch.inference_mode()
def speculative_generate(
    target: Any,
    draft: Any,
    input_ids: Tensor,
    *,
    max_new_tokens: int | None = None,
    num_draft_tokens: int = 4,
    schedule: str = "auto",
    max_draft_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int | None = None,
    min_length: int | None = None,
    generation_config: Any = None,
    generator: torch.Generator | None = None,
    logits_processor: Sequence[LogitsProcessor] | None = None,
    attention_mask: Tensor | None = None,
    past_key_values: Any = None,
) -> SpeculativeOutput:
    """Generate with a draft proposing tokens and ``target`` verifying them, exactly.

    A drop-in for ``target.generate(input_ids, ...)`` at batch size 1: every setting left
    ``None`` comes from ``generation_config``, then ``target.generation_config``, then
    transformers' defaults, exactly as ``generate`` reads them (EOS ids, ``max_length`` = 20 new
    tokens by default, ``top_k=50`` when sampling, ...). Greedy: the output is ``generate``'s
    token for token, stopping included. Sampling: the output is distributed as sampling from the
    target with the same temperature/top-k/top-p/repetition penalty (Leviathan et al. 2023).

    Args:
        target: transformers causal LM, eval mode.
        draft: a causal LM sharing the target's vocabulary (wrapped in
            :class:`~llamazh.speculative.ModelDrafter`) or any :class:`Drafter`, e.g.
            :class:`~llamazh.speculative.PromptLookupDrafter`.
        input_ids: ``(1, L)`` int64, ``L >= 1``, on the target's device.
        max_new_tokens: >= 1 tokens to generate at most (wins over ``max_length``).
        num_draft_tokens: >= 1 drafted tokens per step (the start value when adaptive).
        schedule: ``"auto"`` (default): ``"adaptive"`` while drafting pays, plain decoding
            steps with rare probes once the measured tokens per second of drafting fall below
            those of plain steps, so a useless draft costs little
            (:class:`~llamazh.speculative.schedule.CostGate`); ``"constant"``; ``"adaptive"``:
            +2 after a step whose full draft was accepted, -1 (not below 1) after a rejection
            (Chinese-LLaMA-Alpaca-2's rule, also transformers' "heuristic"); ``"throughput"``:
            the length maximising expected tokens per second under the measured acceptance
            rate and draft/verify times.
        max_draft_tokens: cap for the adaptive schedules (default ``4 * num_draft_tokens``).
        do_sample, temperature, top_k, top_p, repetition_penalty: as in ``model.generate``;
            applied to target and draft alike.
        eos_token_id: id or ids that end generation (the EOS is kept in the output); ``[]``
            for none.
        pad_token_id: accepted for ``generate`` compatibility (one sequence is never padded).
        max_length: total length limit (prompt included) when ``max_new_tokens`` is None.
        min_new_tokens, min_length: EOS ids are masked until this many new / total tokens.
        generation_config: a ``transformers.GenerationConfig`` used instead of the target's.
        generator: source of all randomness when sampling (default: one seeded from torch's
            global generator, so ``torch.manual_seed`` makes runs repeatable).
        logits_processor: callables ``(input_ids (1, l), scores (1, V)) -> scores`` applied to
            the target's raw logits for each verified position, before the penalty and warps
            (e.g. :class:`llamazh.guidance.ClassifierFreeGuidance`). They must depend only on
            their arguments, because positions are revisited after rejections.
        attention_mask: optional, must be all ones.
        past_key_values: a croppable cache holding a prefix of ``input_ids`` (minus its last
            token) to reuse; ``None`` for a new ``DynamicCache``.

    Returns:
        :class:`SpeculativeOutput` with the sequence and acceptance statistics.

    Raises:
        ValueError/TypeError: empty or batched prompt, ``num_draft_tokens < 1``,
            ``temperature <= 0`` with sampling, vocabularies that differ, a cache that cannot
            be rolled back (``StaticCache``), bad ``eos_token_id``, a generation setting
            ``generate`` would apply and this loop does not (beam search, ``stop_strings``, ...).

    Example:
        >>> out = speculative_generate(target, draft_model, ids, max_new_tokens=64)
        >>> out.sequences, out.acceptance_rate
    """
    started = time.perf_counter()
    input_ids = _check_prompt(input_ids, attention_mask)
    check_positive_int("num_draft_tokens", num_draft_tokens)
    check_choice("schedule", schedule, SCHEDULES)
    cap = 4 * num_draft_tokens if max_draft_tokens is None else max_draft_tokens
    check_positive_int("max_draft_tokens", cap, minimum=num_draft_tokens)
    settings = resolve_generation(
        target,
        input_ids.shape[1],
        generation_config,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        min_new_tokens=min_new_tokens,
        min_length=min_length,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    max_new_tokens = settings.max_new_tokens
    do_sample = settings.do_sample
    sampling = SamplingConfig(
        do_sample,
        settings.temperature,
        settings.top_k,
        settings.top_p,
        settings.repetition_penalty,
    )
    eos = set(settings.eos_token_ids)
    eos_mask_until = input_ids.shape[1] + settings.min_new_tokens  # min_length, as generate
    processors = list(logits_processor or [])
    vocab = output_vocab_size(target)
    drafter = _as_drafter(draft, vocab)
    device = model_device(target)
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device}, the target on {device}")
    if do_sample:
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator(device=device).manual_seed(seed)
        elif generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, the target on {device}")

    cache = (
        new_dynamic_cache(target)
        if past_key_values is None
        else check_rollback_cache(past_key_values, "past_key_values")
    )
    feed_cache = cache_kwargs(target, cache)  # resolved once, not per forward
    prompt_len = input_ids.shape[1]
    out = SpeculativeOutput(input_ids, prompt_len)
    cached = cache_length(cache)
    if cached > prompt_len - 1:
        raise ValueError(
            f"past_key_values holds {cached} positions but must hold at most len(input_ids) - 1"
            f" = {prompt_len - 1}"
        )
    if cached < prompt_len - 1:  # prefill everything but the last token; its logits come next
        kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(target) else {}
        target(input_ids=input_ids[:, cached:-1], **feed_cache, **kwargs)
        out.target_forward_calls += 1

    seq = input_ids
    scheduler = make_schedule(schedule, num_draft_tokens, cap)
    draft_calls_before = getattr(drafter, "forward_calls", 0)
    while True:
        remaining = max_new_tokens - out.num_new_tokens
        k = scheduler.k
        if k and getattr(drafter, "adaptive_length", False):  # it sizes its own drafts
            k = cap
        k = min(k, remaining - 1)
        tick = time.perf_counter()
        proposal = drafter.draft(seq, k, sampling, generator) if k > 0 else Draft(seq[:, :0], None)
        tock = time.perf_counter()
        drafts = proposal.tokens.to(device)[:, :k]  # (1, kd)
        kd = drafts.shape[1]
        block = torch.cat([seq[:, -1:], drafts], dim=1)  # (1, kd + 1)
        logits = target(input_ids=block, **feed_cache).logits
        out.target_forward_calls += 1
        scores = _process(
            logits[:, -(kd + 1) :],
            torch.cat([seq, drafts], dim=1),
            seq.shape[1],
            processors,
            sampling,
            eos_mask_until,
            settings.eos_token_ids,
        )  # (1, kd + 1, V)
        if scores.shape[-1] != vocab:
            raise ValueError(f"target logits have {scores.shape[-1]} entries, expected {vocab}")
        if do_sample:
            draft_probs = None if proposal.probs is None else proposal.probs[:, :kd].to(device)
            verdict = verify_sampled(
                scores.softmax(dim=-1), draft_probs, drafts, generator=generator
            )
        else:
            verdict = verify_greedy(scores, drafts)
        n = int(verdict.num_accepted[0])
        new = torch.cat([drafts[:, :n], verdict.next_token.view(1, 1)], dim=1)  # (1, n + 1)
        crop_cache(cache, seq.shape[1] + n)  # the sequence minus its new last token

        out.steps += 1
        out.drafted += kd
        out.accepted += n
        out.draft_lengths.append(kd)
        out.accepted_lengths.append(n)
        scheduler.update(k, kd, n, tock - tick, time.perf_counter() - tick)

        stop = False
        if eos:
            hits = [i for i, tok in enumerate(new[0].tolist()) if tok in eos]
            if hits:
                new = new[:, : hits[0] + 1]
                stop = True
        seq = torch.cat([seq, new], dim=1)
        out.sequences = seq
        if stop or out.num_new_tokens >= max_new_tokens:
            break
    out.draft_forward_calls = getattr(drafter, "forward_calls", 0) - draft_calls_before
    out.elapsed_s = time.perf_counter() - started
    return out
