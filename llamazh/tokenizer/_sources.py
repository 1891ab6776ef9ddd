"""One view over the tokenizers users hand us: SentencePiece models and Hugging Face ones."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamazh._files import read_json
from llamazh.tokenizer._proto import BYTE, CONTROL, USER_DEFINED, ModelProto, load_proto

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass(frozen=True)
class TokenizerView:
    """What efficiency and resizing need from a tokenizer, whatever its kind."""

    kind: str  # "sentencepiece" | "hf"
    obj: Any  # SentencePieceProcessor | transformers tokenizer | tokenizers.Tokenizer
    pieces: tuple[str, ...]  # id -> piece (token string)
    byte_ids: frozenset[int]
    proto: Any = None  # the ModelProto for SentencePiece sources

    def __len__(self) -> int:
        return len(self.pieces)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, without BOS/EOS."""
        if self.kind == "sentencepiece":
            return self.obj.encode(texts)
        if hasattr(self.obj, "encode_batch"):  # tokenizers.Tokenizer
            return [e.ids for e in self.obj.encode_batch(texts, add_special_tokens=False)]
        return self.obj(texts, add_special_tokens=False)["input_ids"]


def as_view(value: Any, name: str) -> TokenizerView:
    """Wrap a path / bytes / ``ModelProto`` / ``MergeResult`` / HF tokenizer / ``BPEExtension``.

    Raises:
        TypeError: ``value`` is none of those.
        ValueError: a path or bytes is not a SentencePiece model.
    """
    added: dict[int, tuple[str, bool]] = {}
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if path.is_dir() and (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif path.is_dir() and (path / "tokenizer.model").is_file():
            # a SentencePiece directory: its added tokens (Chinese-Alpaca's [PAD]) are rows too
            added = _directory_added_tokens(path)
            value = path / "tokenizer.model"
        if path.suffix == ".json" and path.is_file():
            from tokenizers import Tokenizer

            return as_view(Tokenizer.from_file(str(path)), name)
    if isinstance(value, (str, os.PathLike, bytes, bytearray, ModelProto)) or (
        hasattr(value, "proto") and isinstance(value.proto, ModelProto)
    ):
        import sentencepiece as spm

        proto = _with_added(load_proto(value, name), added, name)
        sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        pieces = tuple(p.piece for p in proto.pieces)
        byte_ids = frozenset(i for i, p in enumerate(proto.pieces) if p.type == BYTE)
        return TokenizerView("sentencepiece", sp, pieces, byte_ids, proto)
    if isinstance(value, spm_processor_type()):
        proto = ModelProto()
        proto.ParseFromString(value.serialized_model_proto())
        return as_view(proto, name)
    sp_model = getattr(value, "sp_model", None)
    if sp_model is not None and isinstance(sp_model, spm_processor_type()):
        # transformers' SentencePieceBackend (what AutoTokenizer gives for a seed-merge export)
        proto = ModelProto()
        proto.ParseFromString(sp_model.serialized_model_proto())
        decoder = getattr(value, "added_tokens_decoder", {}) or {}
        extra = {i: (t.content, bool(t.special)) for i, t in decoder.items()}
        return as_view(_with_added(proto, extra, name), name)
    if hasattr(value, "new_tokens") and hasattr(value, "tokenizer"):  # a BPEExtension
        value = value.tokenizer
    backend = getattr(value, "backend_tokenizer", None)
    if backend is None and type(value).__module__.startswith("tokenizers"):
        backend = value
    if backend is None:
        raise TypeError(
            f"{name} must be a SentencePiece model (path, bytes, ModelProto, MergeResult), a "
            f"Hugging Face fast tokenizer or a BPEExtension, got {type(value).__name__}"
        )
    size = backend.get_vocab_size(with_added_tokens=True)
    pieces = tuple(backend.id_to_token(i) or "" for i in range(size))
    byte_ids = frozenset(i for i, p in enumerate(pieces) if _BYTE_TOKEN.match(p))
    return TokenizerView("hf", value, pieces, byte_ids)


def _directory_added_tokens(path: Path) -> dict[int, tuple[str, bool]]:
    """Id -> (content, special) of the added tokens a tokenizer directory declares."""
    added: dict[int, tuple[str, bool]] = {}
    if (path / "added_tokens.json").is_file():  # the older format: {content: id}
        table = read_json(path / "added_tokens.json", "a map of added tokens to ids")
        added.update({int(i): (str(c), True) for c, i in table.items()})
    if (path / "tokenizer.json").is_file():  # a fast tokenizer saved beside the model
        spec = read_json(path / "tokenizer.json", "a Hugging Face tokenizer.json")
        for t in spec.get("added_tokens") or []:
            added[int(t["id"])] = (str(t["content"]), bool(t.get("special", True)))
    if (path / "tokenizer_config.json").is_file():
        config = read_json(path / "tokenizer_config.json", "a tokenizer config")
        for i, spec in (config.get("added_tokens_decoder") or {}).items():
            added[int(i)] = (str(spec["content"]), bool(spec.get("special", True)))
    return added


def _with_added(proto: Any, added: dict[int, tuple[str, bool]], name: str) -> Any:
    """``proto`` plus the added tokens past its last piece (special: CONTROL, else USER_DEFINED).

    Raises:
        ValueError: the added ids past the model's pieces are not consecutive.
    """
    n = len(proto.pieces)
    extra = sorted(i for i in added if i >= n)
    if not extra:
        return proto
    if extra != list(range(n, n + len(extra))):
        raise ValueError(
            f"{name} declares added tokens at ids {extra[:5]}... but its model has {n} pieces; "
            f"added ids must continue from {n} without gaps"
        )
    known = {p.piece for p in proto.pieces}
    out = ModelProto()
    out.CopyFrom(proto)
    for i in extra:
        content, special = added[i]
        if content in known:
            raise ValueError(f"{name}: added token {i} ({content!r}) duplicates a model piece")
        piece = out.pieces.add()
        piece.piece, piece.score = content, 0.0
        piece.type = CONTROL if special else USER_DEFINED
        known.add(content)
    return out


def spm_processor_type() -> type:
    import sentencepiece as spm

    return spm.SentencePieceProcessor


def piece_splitter(view: TokenizerView) -> Any:
    """A function: piece string -> ids ``view`` encodes exactly that piece into.

    SentencePiece: the model with its dummy prefix turned off, on the piece with "▁" read as
    a space. Hugging Face: the backend model run on the token string (no normalizer).
    """
    if view.kind == "sentencepiece":
        import sentencepiece as spm

        proto = ModelProto()
        proto.CopyFrom(view.proto)
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return lambda piece: sp.encode(piece.replace("\u2581", " "))
    backend = getattr(view.obj, "backend_tokenizer", view.obj)
    model = backend.model
    return lambda piece: [t.id for t in model.tokenize(piece)]
