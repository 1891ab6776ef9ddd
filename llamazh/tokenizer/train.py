"""Train a new-language SentencePiece model whose pieces merge cleanly into a LLaMA vocabulary."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from llamazh._atomic import atomic_write_bytes
from llamazh._checks import check_new_path, check_positive_int

#: Trainer settings used unless overridden, each chosen for merging into a LLaMA BPE model.
TRAIN_DEFAULTS: MappingProxyType[str, Any] = MappingProxyType(
    {
        # LLaMA is BPE; BPE encoding can only reach a piece whose halves are pieces too, and
        # a BPE-trained vocabulary has that property by construction (a unigram one does not).
        "model_type": "bpe",
        # SentencePiece's recommended value for CJK: the rarest 0.05% of characters are left
        # out (they fall back to bytes) instead of spending thousands of pieces on them.
        "character_coverage": 0.9995,
        # LLaMA splits numbers into digits; multi-digit pieces appended by a merge would
        # change how every number is tokenized, so the new vocabulary must not learn them.
        "split_digits": True,
        # The new model is lossless on its own (efficiency tables compare it standalone);
        # its 256 byte pieces are never appended, the base already has them.
        "byte_fallback": True,
        # The merged model keeps the *base* normalizer (LLaMA: identity, dummy prefix, no
        # whitespace folding). Training under the same normalization makes the learned pieces
        # the ones the merged model actually sees (NFKC would learn "," for "，").
        "normalization_rule_name": "identity",
        "add_dummy_prefix": True,
        "remove_extra_whitespaces": False,
        # Whitespace runs are LLaMA's business (it has "▁▁"... at the lowest priority); the new
        # vocabulary spends its budget on text.
        "allow_whitespace_only_pieces": False,
        # Keep Han and Latin apart (no "GPU的" pieces) and cap piece length like LLaMA.
        "split_by_unicode_script": True,
        "max_sentencepiece_length": 16,
        # One paragraph per line is common in Chinese corpora: 4,192 bytes (the default) is
        # only ~1,400 CJK characters, and longer lines would be dropped silently.
        "max_sentence_length": 16384,
        # Same special ids as LLaMA, so the standalone model decodes like the merged one.
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": -1,
        # Fail loudly when the corpus cannot support vocab_size instead of returning less.
        "hard_vocab_limit": True,
        "minloglevel": 1,
    }
)

_RESERVED = ("input", "model_prefix", "sentence_iterator", "model_writer", "vocab_size")


def train_sentencepiece(
    files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    vocab_size: int = 20000,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Train a SentencePiece model on UTF-8 text files, with settings suited to a LLaMA merge.

    Every line of every file is one training sentence (empty lines are skipped). The
    defaults are :data:`TRAIN_DEFAULTS` (BPE, character coverage 0.9995, digits split,
    byte fallback, identity normalization, LLaMA's special ids; each commented there);
    ``overrides`` replace any of them or set other ``TrainerSpec`` fields
    (``num_threads`` defaults to the CPU count, at most 16).

    Args:
        files: one path or a list of paths of UTF-8 text.
        output: path of the ``.model`` file to write (atomically: a temporary sibling,
            then a rename).
        vocab_size: number of pieces, including the 3 specials and 256 byte pieces.
        overwrite: replace an existing ``output``.
        **overrides: ``TrainerSpec`` fields, e.g. ``character_coverage=0.9999``.

    Returns:
        ``Path(output)``.

    Raises:
        FileNotFoundError: a file in ``files`` does not exist.
        FileExistsError: ``output`` exists and ``overwrite`` is false.
        ValueError: a file is not UTF-8; the corpus has no non-empty line; the corpus cannot
            support ``vocab_size``; an override is unknown or reserved.

    Example:
        >>> path = train_sentencepiece("data/corpus/zh_d2l.txt", "zh.model", vocab_size=8000)
        >>> merged = merge_sentencepiece("data/tokenizers/llama2.model", path)
    """
    paths = _check_files(files)
    vocab_size = check_positive_int("vocab_size", vocab_size)
    out = check_new_path("output", output, overwrite=overwrite)
    reserved = sorted(set(overrides) & set(_RESERVED))
    if reserved:
        raise ValueError(
            f"overrides may not set {', '.join(reserved)}: train_sentencepiece sets them from "
            "its arguments (files, output, vocab_size)"
        )
    lines = _count_lines(paths)
    if lines == 0:
        raise ValueError(f"files={[str(p) for p in paths]!r} hold no non-empty line to train on")
    settings = {**TRAIN_DEFAULTS, "num_threads": min(os.cpu_count() or 1, 16), **overrides}

    import sentencepiece as spm

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_iter_lines(paths),
            model_writer=writer,
            vocab_size=vocab_size,
            **settings,
        )
    except RuntimeError as exc:
        message = str(exc)
        if "unknown field name" in message:
            raise ValueError(f"overrides: {message}") from None
        if "ocabulary size" in message:
            raise ValueError(
                f"vocab_size={vocab_size} does not fit this corpus "
                f"({lines} lines): {message.split('] ')[-1]}"
            ) from None
        raise ValueError(f"SentencePiece training failed: {message}") from None
    return atomic_write_bytes(out, writer.getvalue())


def _check_files(files: Any) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not isinstance(files, Sequence) or not files:
        raise TypeError(f"files must be a path or a non-empty list of paths, got {files!r}")
    paths = []
    for f in files:
        if not isinstance(f, (str, os.PathLike)):
            raise TypeError(f"files must hold paths, got {f!r} ({type(f).__name__})")
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"files: {str(p)!r} is not an existing file")
        paths.append(p)
    return paths


def _count_lines(paths: list[Path]) -> int:
    count = 0
    for p in paths:
        try:
            with p.open(encoding="utf-8") as fh:
                count += sum(1 for line in fh if line.strip())
        except UnicodeDecodeError as exc:
            raise ValueError(f"files: {str(p)!r} is not UTF-8 text ({exc})") from None
    return count


def _iter_lines(paths: list[Path]) -> Iterator[str]:
    for p in paths:
        with p.open(encoding="utf-8") as fh:
            for line in fh:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
