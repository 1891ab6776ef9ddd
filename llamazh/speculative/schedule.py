"""Draft-length schedules: how many tokens to draft next, from what the last steps measured.

Every schedule has ``k`` (the next draft length; 0 = a plain decoding step, no drafter call)
and ``update(asked, drafted, accepted, draft_s, step_s)``, called after every step with what
was asked, what the drafter proposed, how many of those the target accepted, and the measured
wall time of drafting and of the whole step (``time.perf_counter`` seconds).
"""

from __future__ import annotations

SCHEDULES = ("auto", "adaptive", "constant", "throughput")


class ConstantSchedule:
    """Always ``k`` tokens."""

    def __init__(self, k: int, cap: int) -> None:
        self.k = k

    def update(self, asked: int, drafted: int, accepted: int, draft_s: float, step_s: float):
        return self.k


class HeuristicSchedule(ConstantSchedule):
    """+2 after a step whose full draft was accepted, -1 (not below 1) after a rejection
    (Chinese-LLaMA-Alpaca-2's rule, also transformers' ``"heuristic"``)."""

    def __init__(self, k: int, cap: int) -> None:
        self.k, self.cap = k, cap

    def update(self, asked: int, drafted: int, accepted: int, draft_s: float, step_s: float):
        if drafted:
            if accepted < drafted:
                self.k = max(1, self.k - 1)
            elif drafted == asked:
                self.k = min(self.cap, self.k + 2)
        return self.k


class ThroughputSchedule(ConstantSchedule):
    """Pick the draft length that maximises expected tokens per second.

    With per-token acceptance ``a`` (decayed running estimate, geometric model), draft cost
    ``t_d`` per token and verification cost ``t_v`` per step (decayed running means of measured
    wall time), a step drafting ``k`` tokens yields ``(1 - a^(k+1)) / (1 - a)`` tokens in
    ``k t_d + t_v`` seconds (Leviathan et al. 2023, section 3.4).
    """

    decay = 0.8

    def __init__(self, k: int, cap: int) -> None:
        self.k, self.cap = k, cap
        self.accepted, self.trials = 1.0, 2.0  # prior a = 0.5
        self.t_draft: float | None = None
        self.t_verify: float | None = None

    def _mean(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def update(self, asked: int, drafted: int, accepted: int, draft_s: float, step_s: float):
        if not drafted:
            return self.k
        n, kd = accepted, drafted
        self.accepted = self.decay * self.accepted + n
        self.trials = self.decay * self.trials + n + (n < kd)
        self.t_draft = self._mean(self.t_draft, draft_s / kd)
        self.t_verify = self._mean(self.t_verify, step_s - draft_s)
        a = min(self.accepted / self.trials, 0.999)
        rate = [
            (1 - a ** (k + 1)) / (1 - a) / (k * self.t_draft + self.t_verify)
            for k in range(1, self.cap + 1)
        ]
        self.k = 1 + max(range(self.cap), key=rate.__getitem__)
        return self.k


class CostGate:
    """Draft only while drafting pays: the default (``schedule="auto"``).

    Drafting steps run ``inner`` (the +2/-1 heuristic) and measure tokens emitted per second
    (decayed sums of tokens and of wall time); plain steps (``k = 0``, and steps where the drafter
    found nothing) measure the plain decoding rate. When the drafting rate falls below the plain
    rate, the gate closes: plain steps only, then one probe of ``probe_tokens`` after
    ``backoff`` steps, ``backoff`` doubling (up to ``max_backoff``) after every probe that does
    not pay and resetting after one that does. The first step is such a probe. A useless draft
    thus costs a few one-token probes; transformers' dynamic speculation and llama.cpp's
    ``n_min``/``p_min`` are the same idea, decided per token by the draft's confidence rather
    than by measured time.
    """

    decay = 0.7
    first_backoff, max_backoff, probe_tokens = 16, 128, 1

    def __init__(self, k: int, cap: int) -> None:
        self.inner = HeuristicSchedule(k, cap)
        # The first step is a probe too: a draft that pays goes on at k + 2 after it, one that
        # does not has cost a single drafted token.
        self.k = self.probe_tokens
        self.backoff = self.first_backoff
        self.wait = 0  # plain steps left before the next probe
        self.probing = True
        self.draft_tokens = self.draft_time = 0.0
        self.plain_time: float | None = None  # decayed mean seconds per plain step

    def update(self, asked: int, drafted: int, accepted: int, draft_s: float, step_s: float):
        if not drafted:
            old, d = self.plain_time, self.decay
            self.plain_time = step_s if old is None else d * old + (1 - d) * step_s
            if self.wait:
                self.wait -= 1
                if not self.wait:
                    self.k, self.probing = self.probe_tokens, True
            return self.k
        self.inner.update(asked, drafted, accepted, draft_s, step_s)
        self.draft_tokens = self.decay * self.draft_tokens + accepted + 1
        self.draft_time = self.decay * self.draft_time + step_s
        # before any plain step, a plain step is taken to cost what verifying did
        plain = self.plain_time if self.plain_time is not None else step_s - draft_s
        if self.draft_tokens / self.draft_time >= 1.0 / plain:
            self.k = self.inner.k
            if self.probing:  # a probe paid: drafting is back
                self.backoff, self.probing = self.first_backoff, False
            return self.k
        self.draft_tokens = self.draft_time = 0.0  # judge the next probe on its own
        self.wait, self.probing = self.backoff, False
        self.backoff = min(2 * self.backoff, self.max_backoff)
        self.k = 0
        return self.k


def make_schedule(name: str, k: int, cap: int):
    """The schedule called ``name`` (one of :data:`SCHEDULES`) starting at ``k``, capped at
    ``cap``."""
    return {
        "auto": CostGate,
        "adaptive": HeuristicSchedule,
        "constant": ConstantSchedule,
        "throughput": ThroughputSchedule,
    }[name](k, cap)
