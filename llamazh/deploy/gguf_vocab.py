"""The tokenizer part of a GGUF file: vocabulary, merges or scores, token types, specials.

Two vocabulary kinds are written, the two llamazh produces:

* SentencePiece BPE (``tokenizer.model``: Llama-2 and :func:`merge_sentencepiece` merges, seed
  or rank): llama.cpp's ``"llama"`` vocabulary, pieces with their scores and types; added tokens
  of the directory (an added ``[PAD]``) follow as control / user-defined tokens. llama.cpp breaks
  score ties leftmost first, as sentencepiece does, so seed merges encode exactly.
* byte-level BPE (``tokenizer.json``: SmolLM2, Llama-3 and :func:`extend_bpe` extensions):
  llama.cpp's ``"gpt2"`` vocabulary with its merges. llama.cpp splits text with a fixed regex
  per *pre-tokenizer name*; its own converter recognises the name by hashing the ids of a test
  string, which an extended vocabulary changes. The pre-tokenizer itself is the base's (an
  extension never changes it), so here the name comes from the pre-tokenizer's definition:
  :data:`PRE_TOKENIZERS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamazh._files import read_json

# GGUF token types (llama.cpp's llama_token_type; SentencePiece's piece types use the same values)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: llama.cpp pre-tokenizer name -> the ``tokenizer.json`` pre-tokenizer steps it splits like.
#: ``ByteLevel`` with ``use_regex`` splits by GPT-2's regex; a ``Split`` names its own.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gpt-2": (("ByteLevel", "regex"),),
    "smollm": (("Digits", "individual"), ("ByteLevel", "regex")),
    "llama-bpe": (("Split", _LLAMA3_REGEX), ("ByteLevel", "no-regex")),
    "qwen2": (("Split", _QWEN2_REGEX), ("ByteLevel", "no-regex")),
}


@dataclass
class GGUFVocab:
    """Everything the ``tokenizer.ggml.*`` keys hold."""

    model: str  # "llama" (SentencePiece) | "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_space_prefix: bool | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad/eot
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def read_vocab(model_dir: Path) -> GGUFVocab:
    """The GGUF vocabulary of the tokenizer saved in ``model_dir``.

    Raises:
        ValueError: no tokenizer, or a kind GGUF export does not support (not BPE, a
            byte-level pre-tokenizer llama.cpp has no name for).
    """
    from transformers import AutoTokenizer

    spm_path, json_path = model_dir / "tokenizer.model", model_dir / "tokenizer.json"
    if not spm_path.is_file() and not json_path.is_file():
        raise ValueError(
            f"model_dir={str(model_dir)!r} has no tokenizer.model or tokenizer.json: export_gguf "
            "writes the tokenizer into the file, so save it with the model"
        )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if spm_path.is_file() and _is_spm_bpe(spm_path):
        vocab = _sentencepiece_vocab(model_dir)
    elif json_path.is_file():
        vocab = _bytelevel_vocab(json_path)
    else:
        raise ValueError(
            f"{str(spm_path)!r} is not a BPE SentencePiece model and there is no "
            "tokenizer.json: export_gguf supports SentencePiece BPE and byte-level BPE"
        )
    index = {t: i for i, t in enumerate(vocab.tokens)}
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tok, f"{name}_token_id", None)
        if token_id is not None:
            vocab.special_ids[name] = int(token_id)
    for eot in ("<|im_end|>", "<|eot_id|>"):
        if eot in index:
            vocab.special_ids["eot"] = index[eot]
    probe = tok("a").input_ids
    bos, eos = vocab.special_ids.get("bos"), vocab.special_ids.get("eos")
    vocab.add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    vocab.add_eos = eos is not None and len(probe) > 0 and probe[-1] == eos
    template = getattr(tok, "chat_template", None)
    vocab.chat_template = template if isinstance(template, str) else None
    return vocab


def _is_spm_bpe(path: Path) -> bool:
    from llamazh.tokenizer._proto import BPE_TYPE, load_proto

    try:
        return load_proto(path, "tokenizer.model").trainer_spec.model_type == BPE_TYPE
    except ValueError:  # not a SentencePiece model (Llama-3 ships a tiktoken file by that name)
        return False


def _sentencepiece_vocab(model_dir: Path) -> GGUFVocab:
    from llamazh.tokenizer._proto import load_proto
    from llamazh.tokenizer._sources import _directory_added_tokens, _with_added

    base = load_proto(model_dir / "tokenizer.model", "tokenizer.model")
    proto = _with_added(base, _directory_added_tokens(model_dir), "model_dir's tokenizer")
    return GGUFVocab(
        model="llama",
        pre="default",
        tokens=[p.piece for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces],
        scores=[float(p.score) for p in proto.pieces],
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
    )


def _bytelevel_vocab(json_path: Path) -> GGUFVocab:
    data = read_json(json_path, "a Hugging Face tokenizer.json")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(
            f"{str(json_path)!r} holds a {model.get('type')!r} model; export_gguf supports BPE "
            "(byte-level, or SentencePiece BPE through tokenizer.model)"
        )
    if model.get("byte_fallback"):
        raise ValueError(
            f"{str(json_path)!r} is a SentencePiece-style BPE (byte_fallback) without a "
            "tokenizer.model; save the SentencePiece model with it (export_hf_tokenizer and "
            "llamazh.tokenizer.save_tokenizer do, save_pretrained does not)"
        )
    pre = pre_tokenizer_name(data.get("pre_tokenizer"), where=str(json_path))
    vocab: dict[str, int] = model["vocab"]
    added = {int(t["id"]): t for t in data.get("added_tokens") or []}
    size = max([*vocab.values(), *added]) + 1
    tokens: list[str | None] = [None] * size
    types = [NORMAL] * size
    for token, i in vocab.items():
        tokens[i] = token
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = CONTROL if t.get("special") else USER_DEFINED
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise ValueError(f"{str(json_path)!r} has no token for ids {holes[:5]}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return GGUFVocab(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges)  # type: ignore[arg-type]


def pre_tokenizer_name(spec: Any, *, where: str = "tokenizer.json") -> str:
    """llama.cpp's name for the ``tokenizer.json`` pre-tokenizer ``spec`` (a dict).

    Raises:
        ValueError: no entry of :data:`PRE_TOKENIZERS` splits text like ``spec``.

    Example:
        >>> pre_tokenizer_name({"type": "ByteLevel", "use_regex": True})
        'gpt-2'
    """
    steps = _steps(spec)
    for name, expected in PRE_TOKENIZERS.items():
        if steps == expected:
            return name
    raise ValueError(
        f"{where}: the pre-tokenizer {json.dumps(spec)[:300]} matches none llama.cpp knows "
        f"among {sorted(PRE_TOKENIZERS)}; export_gguf cannot name it"
    )


def _steps(spec: Any) -> tuple[tuple[str, ...], ...] | None:
    if not isinstance(spec, dict):
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        parts = [_steps(s) for s in spec.get("pretokenizers") or []]
        if any(p is None for p in parts):
            return None
        return tuple(step for p in parts for step in p)  # type: ignore[union-attr]
    if kind == "ByteLevel":
        return (("ByteLevel", "regex" if spec.get("use_regex", True) else "no-regex"),)
    if kind == "Digits":
        return (("Digits", "individual" if spec.get("individual_digits") else "grouped"),)
    if kind == "Split" and spec.get("behavior") == "Isolated" and not spec.get("invert"):
        pattern = spec.get("pattern") or {}
        return (("Split", pattern.get("Regex") or pattern.get("String") or ""),)
    return None
