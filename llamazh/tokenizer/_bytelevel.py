"""Byte-level BPE tokenizers (``tokenizer.json``): loading one with its side files, checking it
is byte-level, and the GPT-2 byte <-> character alphabet its tokens are written in."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from llamazh.tokenizer.merge import has_cjk

#: Files of a Hugging Face tokenizer directory that describe settings, not the vocabulary;
#: copied by :meth:`BPEExtension.save`. ``vocab.json``/``merges.txt``/``tokenizer.model`` are
#: not: they would disagree with the extended ``tokenizer.json``.
SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

SUPPORTED = (
    "byte-level BPE tokenizers (a tokenizers BPE model under a ByteLevel pre-tokenizer: GPT-2, "
    "Llama-3, Qwen2, Mistral-Nemo, SmolLM, ...)"
)


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's byte -> printable character map and its inverse (what ByteLevel writes).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are given the code
    points 256, 257, ... in byte order (so the space 0x20 becomes "Ġ", U+0120).
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    to_char = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in to_char:
            to_char[b] = chr(256 + extra)
            extra += 1
    return to_char, {c: b for b, c in to_char.items()}


def token_bytes(token: str) -> bytes | None:
    """The bytes a byte-level token stands for, or ``None`` if it is not byte-level text."""
    inverse = byte_alphabet()[1]
    try:
        return bytes(inverse[c] for c in token)
    except KeyError:
        return None


def bytes_to_token(data: bytes) -> str:
    """The byte-level token string for ``data``."""
    to_char = byte_alphabet()[0]
    return "".join(to_char[b] for b in data)


def text_of(piece: str) -> str:
    """A pre-token's text (its bytes decoded; invalid bytes as U+FFFD)."""
    data = token_bytes(piece)
    return piece if data is None else data.decode("utf-8", "replace")


def non_ascii_token(data: bytes) -> bool:
    """Whether a token's bytes hold a non-ASCII byte (``scope="non_ascii"``)."""
    return not data.isascii()


# Lead bytes of 3-byte UTF-8 sequences for U+3000..U+9FFF (CJK punctuation, kana, ideographs)
# and U+F000..U+FFFF (compatibility ideographs, full-width forms).
_CJK_LEADS = frozenset([*range(0xE3, 0xEA), 0xEF])


def cjk_token(data: bytes) -> bool:
    """Whether a token's bytes hold a CJK character (:func:`has_cjk`) or may be a fragment of
    one: continuation bytes only (a character's middle or tail), or ending inside a character
    whose lead byte is a CJK one (``scope="cjk"``).

    Example: ``cjk_token("中".encode()[:2]) is True``, ``cjk_token(";”".encode()) is False``.
    """
    i, n = 0, len(data)
    while i < n and 0x80 <= data[i] < 0xC0:
        i += 1
    if i == n:
        return n > 0  # continuation bytes only: the middle or tail of a multi-byte character
    while i < n:
        b0 = data[i]
        size = 1 if b0 < 0x80 else 2 if b0 < 0xE0 else 3 if b0 < 0xF0 else 4
        chunk = data[i : i + size]
        if len(chunk) < size:  # the token ends inside a character: is it a CJK one?
            if b0 in _CJK_LEADS:
                return True
            return b0 == 0xF0 and len(chunk) > 1 and 0xA0 <= chunk[1] < 0xC0
        if has_cjk(chunk.decode("utf-8", "replace")):
            return True
        i += size
    return False


@dataclass(frozen=True)
class BaseTokenizer:
    """A loaded base: the ``tokenizers.Tokenizer``, its JSON, and the side files to keep."""

    tokenizer: Any
    data: dict[str, Any] = field(repr=False)
    side_files: dict[str, bytes] = field(repr=False)


def load_base(value: Any, name: str) -> BaseTokenizer:
    """Load a tokenizer directory, ``tokenizer.json`` path, ``tokenizers.Tokenizer`` or
    transformers fast tokenizer, and check that it is byte-level BPE.

    Raises:
        TypeError: ``value`` is none of those kinds.
        FileNotFoundError: the path (or the directory's ``tokenizer.json``) does not exist.
        ValueError: not a ``tokenizer.json``, or not byte-level BPE.
    """
    from tokenizers import Tokenizer

    side: dict[str, bytes] = {}
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if path.is_dir():
            for fname in SIDE_FILES:
                if (path / fname).is_file():
                    side[fname] = (path / fname).read_bytes()
            path = path / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{name}={str(value)!r} is a directory without a tokenizer.json; "
                    f"supported: {SUPPORTED}"
                )
        elif not path.is_file():
            raise FileNotFoundError(f"{name}={str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            tok = Tokenizer.from_str(text)
        except Exception as exc:
            raise ValueError(f"{name}={str(path)!r} is not a tokenizer.json: {exc}") from None
    elif isinstance(value, Tokenizer):
        text = value.to_str()
        tok = Tokenizer.from_str(text)
    elif isinstance(getattr(value, "backend_tokenizer", None), Tokenizer):
        side = _transformers_side_files(value)
        text = value.backend_tokenizer.to_str()
        tok = Tokenizer.from_str(text)
    else:
        raise TypeError(
            f"{name} must be a tokenizer directory, a tokenizer.json path, a tokenizers.Tokenizer "
            f"or a transformers fast tokenizer, got {type(value).__name__}"
        )
    data = json.loads(text)
    check_byte_level(data, name)
    return BaseTokenizer(tok, data, side)


def check_byte_level(data: dict[str, Any], name: str) -> None:
    """Raise ``ValueError`` unless ``tokenizer.json`` data is a byte-level BPE tokenizer."""
    model = data.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise ValueError(
            f"{name} has a {kind} model; supported: {SUPPORTED}. SentencePiece models are "
            "extended with merge_sentencepiece"
        )
    if not _has_byte_level(data.get("pre_tokenizer")):
        pre = (data.get("pre_tokenizer") or {}).get("type")
        raise ValueError(
            f"{name} is BPE but its pre-tokenizer is {pre} (no ByteLevel step), so its tokens "
            f"are not bytes (a SentencePiece-style BPE?); supported: {SUPPORTED}"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(
            f"{name} uses a continuing_subword_prefix/end_of_word_suffix; supported: {SUPPORTED} "
            "without them"
        )


def _has_byte_level(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre.get("pretokenizers", []) or [])


def _transformers_side_files(tok: Any) -> dict[str, bytes]:
    """The side files ``tok.save_pretrained`` writes (its config and chat template)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return {f: (Path(tmp) / f).read_bytes() for f in SIDE_FILES if (Path(tmp) / f).is_file()}
