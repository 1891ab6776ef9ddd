"""Loading and validating SentencePiece ``ModelProto``s (the one place that parses model files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

ModelProto = sp_pb2.ModelProto
Piece = sp_pb2.ModelProto.SentencePiece

# piece types (sentencepiece_model.proto)
NORMAL = Piece.NORMAL
UNKNOWN = Piece.UNKNOWN
CONTROL = Piece.CONTROL
USER_DEFINED = Piece.USER_DEFINED
BYTE = Piece.BYTE
UNUSED = Piece.UNUSED

# SentencePiece's whitespace escape: " " becomes U+2581 before pieces are matched.
SPACE = "\u2581"


def model_bytes(proto: Any) -> bytes:
    """Serialized bytes of a ``ModelProto``."""
    return proto.SerializeToString()


def load_proto(value: Any, name: str) -> Any:
    """Return a validated ``ModelProto`` from a path, raw bytes or a ``ModelProto``.

    A ``ModelProto`` is returned as a copy, so callers may mutate the result freely.

    Raises:
        TypeError: ``value`` is none of the accepted kinds.
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a SentencePiece model, or is truncated.
    """
    if isinstance(value, ModelProto):
        proto = ModelProto()
        proto.CopyFrom(value)
        where = f"{name} (a ModelProto)"
        _validate(proto, name, where)
        return proto
    if hasattr(value, "proto") and isinstance(value.proto, ModelProto):  # a MergeResult
        return load_proto(value.proto, name)
    if isinstance(value, (bytes, bytearray)):
        data, where = bytes(value), f"{name} (bytes)"
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"{name}={str(path)!r} {what}; expected a SentencePiece .model")
        data, where = path.read_bytes(), f"{name}={str(path)!r}"
    else:
        raise TypeError(
            f"{name} must be a path, bytes or a sentencepiece ModelProto, "
            f"got {type(value).__name__}"
        )
    proto = ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, or RuntimeError with upb
        raise ValueError(f"{where} is not a SentencePiece model (or is truncated): {exc}") from None
    _validate(proto, name, where)
    return proto


def _validate(proto: Any, name: str, where: str) -> None:
    # Pieces are serialized first, so a file cut at a piece boundary still parses: the specs
    # that follow the pieces are then missing. A text file usually fails to parse at all.
    if len(proto.pieces) == 0 or not proto.HasField("normalizer_spec"):
        raise ValueError(
            f"{where} is not a SentencePiece model (or is truncated): it has "
            f"{len(proto.pieces)} pieces and "
            f"{'a' if proto.HasField('normalizer_spec') else 'no'} normalizer spec"
        )
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except Exception as exc:
        raise ValueError(f"{where} is not a loadable SentencePiece model: {exc}") from None


def processor(proto: Any) -> Any:
    """A ``sentencepiece.SentencePieceProcessor`` for ``proto``."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


BPE_TYPE = sp_pb2.TrainerSpec.BPE
TrainerSpec = sp_pb2.TrainerSpec
