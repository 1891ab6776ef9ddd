"""A draft-free drafter: match the context's suffix against everything seen so far, propose
the most frequent continuation for as long as it stays likely.

After SuffixDecoding (Oliaro et al. 2024, https://arxiv.org/abs/2411.04975): the occurrences of
the longest suffix of the context found in the prompt, the generated text and optionally a
corpus of earlier outputs vote, token by token, on what follows; a token's confidence is its
share of the votes, smoothed by a prior of weight ``1 / match length`` (one occurrence of a
2-token match gives 2/3, of a 30-token match 30/31); the draft stops when the running product
of confidences falls below ``min_confidence`` or its length passes ``alpha`` times the match
length. Prompt lookup
(:class:`~llamazh.speculative.PromptLookupDrafter`) instead copies after the latest occurrence
of a fixed-length n-gram, for a fixed number of tokens.

The index is a token -> positions table grown as the sequence grows (reset when the sequence
is not an extension of the last one seen); a match is extended backwards from those positions
with vectorised comparisons, so a step costs O(occurrences of the last token x match length).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from llamazh._checks import check_positive_float, check_positive_int
from llamazh.sampling import SamplingConfig
from llamazh.speculative.drafters import Draft, check_one_sequence

_SEPARATOR = -1  # between corpus documents: no match or continuation crosses it


class _Index:
    """Token ids in one growing array plus, per token, the positions where it occurs."""

    def __init__(self) -> None:
        self.tokens = np.empty(0, dtype=np.int64)
        self.positions: dict[int, list[int]] = defaultdict(list)

    def extend(self, ids: Sequence[int]) -> None:
        start = self.tokens.shape[0]
        self.tokens = np.concatenate([self.tokens, np.asarray(ids, dtype=np.int64)])
        for offset, token in enumerate(ids):
            if token != _SEPARATOR:
                self.positions[token].append(start + offset)

    def matches(
        self, pattern: np.ndarray, limit: int, before: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions ``p < before`` where ``tokens[p] == pattern[-1]`` and how many tokens of
        ``pattern`` (read backwards, at most ``limit``) match ending there."""
        where = np.asarray(self.positions.get(int(pattern[-1]), ()), dtype=np.int64)
        where = where[where < before]
        length = np.ones(where.shape[0], dtype=np.int64)
        alive = np.ones(where.shape[0], dtype=bool)
        for back in range(1, min(limit, pattern.shape[0])):
            at = where - back
            ok = alive & (at >= 0)
            ok[ok] = self.tokens[at[ok]] == pattern[-1 - back]
            length += ok
            alive = ok
            if not alive.any():
                break
        return where, length


class SuffixDrafter:
    """Drafts the likeliest continuation of the context's longest suffix seen before.

    Deterministic (``probs=None``), so exact with greedy and sampled verification. It sizes its
    own drafts (``adaptive_length = True``): the loop asks for its longest draft and this
    drafter returns fewer tokens, or none, when the continuation is not likely enough.

    Args:
        corpus: token id sequences (e.g. earlier outputs for similar requests) searched along
            with the current sequence; ``None`` for none. More can be added with :meth:`add`.
        max_match: longest suffix of the context matched (>= 1).
        min_match: shortest match that may propose anything (>= 1).
        alpha: a draft is at most ``alpha * match length`` tokens long (> 0).
        min_confidence: stop when the product of the drafted tokens' smoothed vote shares
            ``count / (votes + 1 / match length)`` falls below this (in (0, 1]).

    Raises:
        ValueError: out-of-range arguments, a corpus entry that is not a list of ids >= 0.

    Example:
        >>> drafter = SuffixDrafter(corpus=[tok.encode(t) for t in earlier_answers])
        >>> out = speculative_generate(model, drafter, ids, max_new_tokens=128)
    """

    adaptive_length = True

    def __init__(
        self,
        corpus: Iterable[Sequence[int]] | None = None,
        *,
        max_match: int = 32,
        min_match: int = 2,
        alpha: float = 4.0,
        min_confidence: float = 0.4,
    ) -> None:
        self.max_match = check_positive_int("max_match", max_match)
        self.min_match = check_positive_int("min_match", min_match)
        if min_match > max_match:
            raise ValueError(
                f"min_match must be <= max_match, got min_match={min_match}, max_match={max_match}"
            )
        self.alpha = check_positive_float("alpha", alpha)
        self.min_confidence = check_positive_float("min_confidence", min_confidence)
        if self.min_confidence > 1.0:
            raise ValueError(f"min_confidence must be in (0, 1], got {min_confidence}")
        self._corpus = _Index()
        self._live = _Index()
        for document in corpus or ():
            self.add(document)

    def add(self, ids: Sequence[int] | Tensor) -> None:
        """Add one document (token ids) to the corpus, e.g. a finished output."""
        ids = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError("corpus documents must be sequences of token ids (ints >= 0)")
        self._corpus.extend([*ids, _SEPARATOR])

    def _sync(self, seq: np.ndarray) -> None:
        """Make the live index hold ``seq``: extend it, or rebuild it for another sequence."""
        held = self._live.tokens
        n = held.shape[0]
        if n > seq.shape[0] or not np.array_equal(held, seq[:n]):
            self._live, n = _Index(), 0
        if seq.shape[0] > n:
            self._live.extend(seq[n:].tolist())

    def draft(
        self,
        input_ids: Tensor,
        num_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        check_one_sequence(self, input_ids)
        empty = Draft(input_ids.new_empty(1, 0), None)
        seq = input_ids[0].cpu().numpy()
        self._sync(seq)
        length = seq.shape[0]
        if num_tokens < 1 or length < 2:
            return empty
        # (index, occurrence position, match length), the live sequence excluding its end
        found = [
            (index, *index.matches(seq, self.max_match, before))
            for index, before in ((self._live, length - 1), (self._corpus, 1 << 62))
        ]
        best = max((int(lengths.max()) for _, _, lengths in found if lengths.size), default=0)
        if best < self.min_match:
            return empty
        # occurrences of the longest match vote; a continuation reads index.tokens after them,
        # the live one running on into the tokens drafted here (a repeating pattern continues)
        voters = [(index, where[lengths == best] + 1) for index, where, lengths in found]
        limit = min(num_tokens, max(1, int(self.alpha * best)))
        drafted: list[int] = []
        confidence = 1.0
        while len(drafted) < limit:
            votes: dict[int, int] = defaultdict(int)
            nexts = []
            for index, at in voters:
                tokens = self._next(index, at, seq, drafted)
                nexts.append(tokens)
                for token in tokens[tokens != _SEPARATOR].tolist():
                    votes[token] += 1
            if not votes:
                break
            token, count = max(votes.items(), key=lambda kv: kv[1])
            # the prior weighs less as the match (found + drafted so far) gets longer
            confidence *= count / (sum(votes.values()) + 1 / (best + len(drafted)))
            if confidence < self.min_confidence:
                break
            drafted.append(token)
            voters = [(i, at[t == token] + 1) for (i, at), t in zip(voters, nexts)]
        if not drafted:
            return empty
        return Draft(torch.tensor([drafted], dtype=torch.long, device=input_ids.device), None)

    def _next(self, index: _Index, at: np.ndarray, seq: np.ndarray, drafted: list[int]):
        """Tokens at positions ``at`` of ``index`` (the live index continues into ``drafted``)."""
        if index is not self._live:  # a corpus document ends in a separator: at stays inside
            return index.tokens[at]
        extended = np.concatenate([seq, np.asarray(drafted, dtype=np.int64)])
        return extended[at]  # at <= the last drafted position + 1 == len(extended) - 1
