"""Merge an extra SentencePiece vocabulary into a base (LLaMA) one, keeping every base id."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llamazh._atomic import atomic_write_bytes
from llamazh._checks import check_choice, check_new_path, check_positive_int
from llamazh.tokenizer._proto import BPE_TYPE, NORMAL, UNUSED, TrainerSpec, load_proto

SCORE_MODES = ("seed", "rank")
PAD_PIECE = "<unused_{}>"


@dataclass(frozen=True)
class MergeResult:
    """The merged ``ModelProto`` and what the merge did.

    Attributes:
        proto: the merged ``sentencepiece_model_pb2.ModelProto`` (treat it as read-only).
        scores: the score mode used, ``"seed"`` or ``"rank"``.
        base_size: number of pieces in the base model (ids ``0 .. base_size - 1``).
        added: the appended pieces of the extra model, in id order.
        skipped_present: normal pieces of the extra model the base already had.
        skipped_special: control, unknown, byte, user-defined and unused pieces of the extra
            model (never appended).
        padding: the appended unused padding pieces, in id order.
        skipped_filtered: new normal pieces ``piece_filter`` rejected.
    """

    proto: Any = field(repr=False)
    scores: str
    base_size: int
    added: tuple[str, ...] = field(repr=False)
    skipped_present: int
    skipped_special: int
    padding: tuple[str, ...] = field(repr=False)
    skipped_filtered: int = 0

    @property
    def final_size(self) -> int:
        """Number of pieces of the merged model."""
        return len(self.proto.pieces)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data (no pieces), e.g. for JSON."""
        return {
            "scores": self.scores,
            "base_size": self.base_size,
            "added": len(self.added),
            "skipped_present": self.skipped_present,
            "skipped_special": self.skipped_special,
            "skipped_filtered": self.skipped_filtered,
            "padding": len(self.padding),
            "final_size": self.final_size,
        }

    def __str__(self) -> str:
        return (
            f"merged ({self.scores}): {self.base_size} base + {len(self.added)} added "
            f"+ {len(self.padding)} padding = {self.final_size} pieces "
            f"({self.skipped_present} already present, {self.skipped_special} special skipped"
            + (f", {self.skipped_filtered} filtered out" if self.skipped_filtered else "")
            + ")"
        )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the merged ``.model`` atomically and return its path.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is false.
        """
        path = check_new_path("path", path, overwrite=overwrite)
        return atomic_write_bytes(path, self.proto.SerializeToString())


# CJK ideographs (unified, extensions, compatibility), CJK symbols and punctuation, CJK
# compatibility forms, and full-width forms (Chinese punctuation such as "，" and "（").
_CJK_RANGES = (
    (0x3000, 0x303F),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0xFE30, 0xFE4F),
    (0xFF00, 0xFFEF),
    (0x20000, 0x3FFFF),
)


def has_cjk(piece: str) -> bool:
    """Whether ``piece`` holds a CJK character or CJK/full-width punctuation.

    A ``piece_filter`` for Chinese merges: Latin-only pieces learned from English words in
    Chinese text are left out, so the merged model tokenizes English exactly like the base.

    Example: ``has_cjk("▁中国") is True``, ``has_cjk("），") is True``,
    ``has_cjk("▁softmax") is False``.
    """
    return any(lo <= ord(ch) <= hi for ch in piece for lo, hi in _CJK_RANGES)


def merge_sentencepiece(
    base: Any,
    extra: Any,
    *,
    scores: str = "seed",
    pad_to_multiple: int | None = None,
    piece_filter: Callable[[str], bool] | None = None,
) -> MergeResult:
    """Append the normal pieces of ``extra`` that ``base`` lacks to ``base``.

    Base pieces, ids, scores and types never change, nor do the base trainer and normalizer
    specs (so the merged model normalizes text exactly like the base). Pieces of ``extra``
    already in ``base`` are skipped, as are its control, unknown, byte, user-defined and
    unused pieces. New pieces are ``NORMAL`` and keep ``extra``'s order. Scores:

    * ``"seed"``: score 0 for every new piece: the original Chinese-LLaMA merge, piece for
      piece. Score 0 is above every LLaMA merge, and ties between new pieces are broken by
      SentencePiece at encode time by position (leftmost first).
    * ``"rank"``: strictly decreasing scores below every base score, in ``extra``'s order
      (consecutive float32 values), so new merges apply after the base ones in ``extra``'s
      own priority order, and no two pieces that can be merged tie.

    ``pad_to_multiple=N`` then appends ``UNUSED`` pieces ``<unused_0>``, ``<unused_1>``, ...
    (numbers already taken are skipped) until the size is a multiple of N (Chinese-LLaMA-2:
    55,296 = 432 x 128). SentencePiece never emits an unused piece, nor does the exported
    fast tokenizer; they exist to give the embedding matrix a friendly shape.

    Args:
        base: the base model: path, bytes or ``ModelProto`` (BPE, e.g. Llama-2's).
        extra: the model whose pieces are added: path, bytes or ``ModelProto``.
        scores: ``"seed"`` or ``"rank"``.
        pad_to_multiple: pad the final size to a multiple of this, or ``None``.
        piece_filter: append only the new pieces for which it returns true (skipped ones
            count in ``skipped_filtered``); e.g. :func:`has_cjk` keeps Llama-2's English
            tokenization bit for bit by appending only pieces that hold a CJK character.

    Returns:
        A :class:`MergeResult`; ``result.save(path)`` writes the ``.model``.

    Raises:
        ValueError: a model is not a SentencePiece model or is truncated; ``base`` is not BPE;
            ``scores`` or ``pad_to_multiple`` is invalid.

    Example:
        >>> result = merge_sentencepiece("llama2.model", "zh.model", scores="seed")
        >>> print(result)  # merged (seed): 32000 base + ... added ...
        >>> result.save("merged.model")
    """
    check_choice("scores", scores, SCORE_MODES)
    if pad_to_multiple is not None:
        check_positive_int("pad_to_multiple", pad_to_multiple)
    merged = load_proto(base, "base")
    extra_proto = load_proto(extra, "extra")
    if merged.trainer_spec.model_type != BPE_TYPE:
        kind = TrainerSpec.ModelType.Name(merged.trainer_spec.model_type)
        raise ValueError(f"base must be a BPE SentencePiece model, got model_type={kind}")

    base_size = len(merged.pieces)
    present = {p.piece for p in merged.pieces}
    score = np.float32(min(p.score for p in merged.pieces))
    added: list[str] = []
    skipped_present = skipped_special = skipped_filtered = 0
    for piece in extra_proto.pieces:
        if piece.type != NORMAL:
            skipped_special += 1
            continue
        if piece.piece in present:
            skipped_present += 1
            continue
        if piece_filter is not None and not piece_filter(piece.piece):
            skipped_filtered += 1
            continue
        new = merged.pieces.add()
        new.piece = piece.piece
        if scores == "seed":
            # As Chinese-LLaMA's script: the score set (to 0), the type left at its default
            # (NORMAL, so not serialized): the merged file is byte for byte theirs.
            new.score = 0.0
        else:
            new.type = NORMAL
            score = np.nextafter(score, np.float32(-np.inf), dtype=np.float32)
            new.score = float(score)
        present.add(piece.piece)
        added.append(piece.piece)

    padding: list[str] = []
    if pad_to_multiple is not None:
        low = float(min(p.score for p in merged.pieces))
        index = 0
        while len(merged.pieces) % pad_to_multiple:
            while PAD_PIECE.format(index) in present:
                index += 1
            new = merged.pieces.add()
            new.piece, new.type, new.score = PAD_PIECE.format(index), UNUSED, low
            present.add(new.piece)
            padding.append(new.piece)
    return MergeResult(
        proto=merged,
        scores=scores,
        base_size=base_size,
        added=tuple(added),
        skipped_present=skipped_present,
        skipped_special=skipped_special,
        padding=tuple(padding),
        skipped_filtered=skipped_filtered,
    )
