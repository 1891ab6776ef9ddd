"""Data helpers for causal-LM training: fixed blocks, packing, padding collator, loss.

Conventions (transformers'): ``labels`` are aligned with ``input_ids`` and the loss shifts
them (position t predicts token t + 1); ``-100`` marks positions that are not predicted.
Packed rows carry ``position_ids`` restarting at 0 for each sequence and ``cu_seq_lens_q/k``
(int32 offsets, varlen attention's ``cu_seqlens``); the first label of every sequence is -100
so that no sequence predicts the start of the next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llamazh._checks import check_positive_int

IGNORE_INDEX = -100


def group_into_blocks(
    documents: Iterable[Sequence[int]],
    block_size: int,
    *,
    eos_token_id: int | None = None,
    drop_last: bool = True,
) -> Tensor:
    """Concatenate token documents and cut them into fixed blocks (continued pre-training).

    Args:
        documents: token-id sequences (one per line/document).
        block_size: tokens per block.
        eos_token_id: appended to every document (Chinese-LLaMA-2's recipe; v1 omitted it and
            its models did not learn to stop).
        drop_last: drop the final partial block; if false, a partial block raises instead of
            being padded silently (pad it yourself with :class:`CausalLMCollator`).

    Returns:
        int64 (N, block_size).

    Example:
        >>> group_into_blocks([[5, 6, 7], [8, 9]], 2, eos_token_id=2)
        tensor([[5, 6], [7, 2], [8, 9]])
    """
    check_positive_int("block_size", block_size)
    stream: list[int] = []
    for doc in documents:
        stream.extend(int(t) for t in doc)
        if eos_token_id is not None:
            stream.append(eos_token_id)
    n = len(stream) // block_size
    if not drop_last and len(stream) % block_size:
        raise ValueError(
            f"{len(stream)} tokens do not fill whole blocks of block_size={block_size} "
            f"({len(stream) % block_size} left over) and drop_last=False"
        )
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def pack_sequences(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into rows of at most ``max_tokens`` tokens (first-fit decreasing).

    Args:
        lengths: length of each sequence; each must be in [1, max_tokens].
        max_tokens: capacity of one packed row.

    Returns:
        Lists of indices into ``lengths``, one per row; every index appears exactly once and
        each list keeps ascending order.

    Raises:
        ValueError: a sequence is empty or longer than ``max_tokens`` (never truncated silently).

    Example:
        >>> pack_sequences([5, 3, 4, 2], 8)
        [[0, 1], [2, 3]]
    """
    check_positive_int("max_tokens", max_tokens)
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_tokens:
            raise ValueError(f"lengths[{i}]={n} must be in [1, max_tokens={max_tokens}]")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(r) for r in rows]


def _split(example: Any) -> tuple[list[int], list[int] | None]:
    if isinstance(example, Mapping):
        ids = [int(t) for t in example["input_ids"]]
        labels = example.get("labels")
        labels = None if labels is None else [int(t) for t in labels]
        if labels is not None and len(labels) != len(ids):
            raise ValueError(f"labels has length {len(labels)} but input_ids has {len(ids)}")
        return ids, labels
    ids = [int(t) for t in (example.tolist() if isinstance(example, Tensor) else example)]
    return ids, None


@dataclass(frozen=True)
class CausalLMCollator:
    """Collate examples (token lists, or dicts with ``input_ids`` and optional ``labels``) into
    a batch for a causal LM.

    Padded mode (``pack=False``): right-padded ``input_ids`` (B, S) with ``pad_token_id``,
    ``attention_mask`` (B, S) and ``labels`` (B, S) with -100 on padding (and wherever the
    example's own labels are -100, e.g. a masked prompt).

    Packed mode (``pack=True``): one row (1, T) holding all examples back to back, with
    ``position_ids`` (1, T), ``cu_seq_lens_q``/``cu_seq_lens_k`` (n + 1,) int32 and
    ``max_length_q``/``max_length_k`` and ``use_cache=False``; no attention mask: transformers
    builds the block-diagonal mask from ``position_ids`` (only without a KV cache, hence
    ``use_cache=False``), flash-attention-style kernels read ``cu_seqlens``. Pass the whole
    dict to the model (``model(**batch)``). The loss equals the token-weighted loss of the
    examples run separately.

    Args:
        pad_token_id: id used for padding (padded mode).
        pack: packed mode.
        pad_to_multiple_of: round S up (padded mode).

    Example:
        >>> batch = CausalLMCollator(pad_token_id=0)([[5, 6, 7], [8, 9]])
        >>> batch["labels"]
        tensor([[   5,    6,    7], [   8,    9, -100]])
    """

    pad_token_id: int = 0
    pack: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        if not examples:
            raise ValueError("examples is empty")
        pairs = [_split(e) for e in examples]
        for i, (ids, _) in enumerate(pairs):
            if not ids:
                raise ValueError(f"examples[{i}] has no tokens")
        if self.pack:
            return self._packed(pairs)
        length = max(len(ids) for ids, _ in pairs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        input_ids = torch.full((len(pairs), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(pairs), length), dtype=torch.long)
        for row, (ids, lab) in enumerate(pairs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(ids if lab is None else lab)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def _packed(self, pairs: list[tuple[list[int], list[int] | None]]) -> dict[str, Any]:
        ids_all: list[int] = []
        labels_all: list[int] = []
        positions: list[int] = []
        offsets = [0]
        for ids, lab in pairs:
            lab = list(ids if lab is None else lab)
            lab[0] = IGNORE_INDEX  # the previous sequence's last token must not predict it
            ids_all += ids
            labels_all += lab
            positions += range(len(ids))
            offsets.append(offsets[-1] + len(ids))
        cu = torch.tensor(offsets, dtype=torch.int32)
        longest = max(len(ids) for ids, _ in pairs)
        return {
            "input_ids": torch.tensor([ids_all], dtype=torch.long),
            "labels": torch.tensor([labels_all], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
            # transformers only builds the block-diagonal mask from position_ids when no KV
            # cache exists, and an eval-mode model creates one unless told not to
            "use_cache": False,
        }


def causal_lm_loss(logits: Tensor, labels: Tensor, *, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy: logits (B, S, V) at t against labels (B, S) at t + 1, -100
    ignored, computed in fp32; ``reduction="mean"`` averages over predicted tokens, ``"sum"``
    sums (divide by the global token count yourself under gradient accumulation/data parallel).

    Example:
        >>> loss = causal_lm_loss(model(input_ids).logits, batch["labels"])
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    # shift the labels, not the logits: slicing (B, S, V) would cost a full-size zero-filled
    # gradient buffer in backward
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # (B, S) -> (B*S,)
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (B, S, V) -> (B*S, V)
    return F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction=reduction)
