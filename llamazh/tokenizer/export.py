"""Export a SentencePiece BPE model as a Hugging Face tokenizer directory that encodes like it.

SentencePiece BPE repeatedly merges the adjacent pair whose merged piece has the highest
score, breaking score ties by position (leftmost first). ``tokenizers`` BPE merges the pair of
lowest *rank*, a total order on merges. The fast tokenizer written here therefore ranks
merges by score (highest first); among equal scores, merges whose right half is shorter, then
whose left half is longer, come first: the order that reproduces SentencePiece's leftmost
growth of whitespace runs (LLaMA gives all its whitespace pieces the same score, -1e9).

What that buys, measured on ``data/corpus`` (see ``tests/tokenizer/test_export.py``):
identical ids for the Llama-2 model and for ``merge_sentencepiece(..., scores="rank")``
models (no two mergeable pieces tie). A ``scores="seed"`` model gives thousands of new pieces
the same score 0, and SentencePiece resolves them by position; no fixed rank order can (the
pieces "AB" and "BA" alone force "ABA" -> AB|A and "BAB" -> BA|B). Its fast tokenizer is
therefore only approximate; :func:`export_hf_tokenizer` exports such models for transformers'
``SentencePieceBackend`` instead (sentencepiece itself behind ``AutoTokenizer``: exact ids), and
warns if asked for the fast tokenizer anyway (:func:`tied_merge_pieces`).

Not reproduced: USER_DEFINED pieces (sentencepiece matches them verbatim before BPE; Llama-2
and merges of it have none) and normalizers other than identity (refused).

The dummy prefix is done by a ``Prepend`` normalizer (SentencePiece adds "▁" even before a
leading space; the ``Metaspace`` pre-tokenizer transformers' ``LlamaTokenizer`` rebuilds does
not), which is why the configuration names ``PreTrainedTokenizerFast``: it loads
``tokenizer.json`` as written.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from llamazh._atomic import atomic_dir
from llamazh._checks import check_choice
from llamazh.tokenizer._proto import BPE_TYPE, CONTROL, NORMAL, SPACE, UNKNOWN, load_proto

#: ``backend`` values of :func:`export_hf_tokenizer`.
EXPORT_BACKENDS = ("auto", "fast", "sentencepiece")


def build_fast_tokenizer(model: Any) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes like SentencePiece ``model`` (no BOS added).

    Args:
        model: a SentencePiece BPE model: path, bytes, ``ModelProto`` or ``MergeResult``.

    Returns:
        A ``tokenizers.Tokenizer`` (BPE with byte fallback, dummy-prefix normalizer, the
        SentencePiece decoder and a BOS post-processor).

    Raises:
        ValueError: ``model`` is not a SentencePiece BPE model.

    Example:
        >>> tok = build_fast_tokenizer("data/tokenizers/llama2.model")
        >>> tok.encode("Hello", add_special_tokens=False).ids
        [15043]
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    proto = load_proto(model, "model")
    if proto.trainer_spec.model_type != BPE_TYPE:
        raise ValueError("model must be a BPE SentencePiece model (the fast export is BPE)")
    spec = proto.normalizer_spec
    if spec.name not in ("identity", "") or spec.precompiled_charsmap:
        raise ValueError(
            f"model's normalizer is {spec.name!r}; only 'identity' (LLaMA's) can be reproduced "
            "exactly by the fast tokenizer"
        )
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ValueError("model treats whitespace as a suffix; the fast export does not")

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_ranked_merges(proto),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    steps = [normalizers.Replace(" ", SPACE)]
    if spec.remove_extra_whitespaces:
        from tokenizers import Regex

        steps = [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " "), *steps]
    if spec.add_dummy_prefix:
        steps.insert(len(steps) - 1, normalizers.Prepend(" "))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    specials = [p.piece for p in proto.pieces if p.type in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    bos_id = proto.trainer_spec.bos_id
    if 0 <= bos_id < len(proto.pieces):
        bos = proto.pieces[bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    return tok


def _ranked_merges(proto: Any) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, ranked as the module says."""
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    keyed = []
    for piece, i in normal.items():
        score = proto.pieces[i].score
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                keyed.append(((-score, len(right), -len(left), i, normal[left]), left, right))
    keyed.sort(key=lambda item: item[0])
    return [(left, right) for _, left, right in keyed]


def tied_merge_pieces(model: Any) -> int:
    """Number of mergeable pieces whose score ties another's (whitespace-only pieces aside).

    Those ties are resolved by position in SentencePiece, which a fast (rank-ordered) BPE
    tokenizer cannot reproduce in general: 0 means the export encodes exactly.
    """
    proto = load_proto(model, "model")
    scores = [
        p.score
        for p in proto.pieces
        if p.type == NORMAL and len(p.piece) > 1 and p.piece.strip(SPACE)
    ]
    return sum(n for n in Counter(scores).values() if n > 1)


def export_hf_tokenizer(
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    pad_token: str | None = None,
    chat_template: str | None = None,
    backend: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face tokenizer directory for a SentencePiece BPE model.

    ``backend`` chooses what ``AutoTokenizer.from_pretrained(out_dir)`` loads:

    * ``"fast"``: ``tokenizer.model`` (the SentencePiece model itself), ``tokenizer.json``
      (fast tokenizer, see the module docstring for the merge order), ``tokenizer_config.json``
      (``PreTrainedTokenizerFast``, BOS added, no EOS, no clean-up of spaces) and
      ``special_tokens_map.json``. It gives ``[bos] + sentencepiece.encode(text)`` and decodes
      back to ``text``, exactly for models without tied merge scores (Llama-2,
      ``scores="rank"`` merges); for tied ones (``scores="seed"``) only approximately (a
      ``UserWarning`` says so).
    * ``"sentencepiece"``: no ``tokenizer.json``; the configuration names transformers'
      ``SentencePieceBackend`` (sentencepiece itself, the model's dummy prefix, BOS by
      ``special_tokens_pattern="bos"``): ``[bos] + sentencepiece.encode(text)`` exactly for
      every model, seed merges included. Its ``decode`` joins piece strings (byte-fallback
      pieces come out as ``"<0xE4>"``, outer spaces are stripped): decode with
      ``tok.sp_model.decode(ids)`` for the exact text.
    * ``"auto"`` (default): ``"sentencepiece"`` when merge scores tie, else ``"fast"``.

    Literal control-token text (``"<s>"``) is read as the special token, as transformers
    does, not as characters.

    Args:
        model: path, bytes, ``ModelProto`` or :class:`MergeResult`.
        out_dir: the directory to create (atomically: built in a temporary sibling).
        pad_token: an existing piece to use as padding (e.g. ``"<unk>"`` or an
            ``<unused_N>`` piece from ``pad_to_multiple``), or ``None`` for no pad token.
            New strings are refused: they would grow the vocabulary past the embeddings.
        chat_template: a Jinja chat template stored in ``tokenizer_config.json``.
        backend: one of :data:`EXPORT_BACKENDS`.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``Path(out_dir)``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false (nothing is written).
        ValueError: ``model`` is not a usable SentencePiece BPE model; ``pad_token`` is not
            one of its pieces; ``backend`` is unknown.

    Example:
        >>> merged = merge_sentencepiece("llama2.model", "zh.model", scores="rank")
        >>> export_hf_tokenizer(merged, "zh-llama-tokenizer")
        >>> AutoTokenizer.from_pretrained("zh-llama-tokenizer")("你好").input_ids
    """
    from tokenizers import AddedToken

    proto = load_proto(model, "model")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"out_dir={str(out)!r} already exists; choose a new directory or pass overwrite=True"
        )
    if chat_template is not None and not isinstance(chat_template, str):
        raise TypeError(f"chat_template must be a str, got {type(chat_template).__name__}")
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    if pad_token is not None and pad_token not in pieces:
        raise ValueError(
            f"pad_token={pad_token!r} is not a piece of the model; use an existing piece such "
            "as '<unk>', or merge with pad_to_multiple and use an '<unused_N>' piece"
        )
    check_choice("backend", backend, EXPORT_BACKENDS)
    tied = tied_merge_pieces(proto)
    if backend == "auto":
        backend = "sentencepiece" if tied else "fast"
    if tied and backend == "fast":
        warnings.warn(
            f"{tied} mergeable pieces share a score (a scores='seed' merge?): SentencePiece "
            "breaks those ties by position, which the fast tokenizer.json cannot reproduce, so "
            "its ids can differ from sentencepiece's on some text; merge with scores='rank' "
            "for an exact fast tokenizer",
            UserWarning,
            stacklevel=2,
        )
    spec = proto.trainer_spec

    def piece(index: int) -> str | None:
        return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None

    special = {
        "bos_token": piece(spec.bos_id),
        "eos_token": piece(spec.eos_id),
        "unk_token": piece(spec.unk_id),
        "pad_token": pad_token if pad_token is not None else piece(spec.pad_id),
    }
    special = {k: v for k, v in special.items() if v is not None}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": "bos_token" in special,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
        **special,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    tok = None
    if backend == "fast":
        tok = build_fast_tokenizer(proto)
        if "pad_token" in special:
            pad = AddedToken(special["pad_token"], normalized=False, special=True)
            tok.add_special_tokens([pad])
    else:
        # transformers' SentencePieceBackend runs sentencepiece itself (legacy: the model's own
        # dummy prefix) and adds BOS by its special_tokens_pattern.
        config["tokenizer_class"] = "SentencePieceBackend"
        config["legacy"] = True
        config["special_tokens_pattern"] = "bos" if "bos_token" in special else "none"
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "tokenizer.model").write_bytes(proto.SerializeToString())
        if tok is not None:
            tok.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", config)
        _write_json(tmp / "special_tokens_map.json", special)
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer: Any, out_dir: str | os.PathLike[str]) -> Path:
    """``tokenizer.save_pretrained(out_dir)``, keeping what transformers' save drops.

    transformers (5.17-5.25) does not save a ``SentencePieceBackend``'s
    ``special_tokens_pattern``: the :func:`export_hf_tokenizer` directory of a seed merge
    adds BOS, its ``save_pretrained`` copy silently does not. This writes the pattern back
    into ``tokenizer_config.json`` so that ``AutoTokenizer.from_pretrained(out_dir)`` encodes
    as ``tokenizer`` does (BOS included). A fast tokenizer loaded from a directory with the
    SentencePiece ``tokenizer.model`` gets that file copied too (``save_pretrained`` drops
    it; GGUF export and sentencepiece need it). Use it (or ``save_adapter(...,
    tokenizer=...)``, which calls it) instead of ``save_pretrained``.

    Args:
        tokenizer: a transformers tokenizer.
        out_dir: directory to write into (created if needed; existing files are replaced,
            as ``save_pretrained`` does).

    Returns:
        ``Path(out_dir)``.

    Example:
        >>> tok = AutoTokenizer.from_pretrained("zh-llama-tokenizer")  # a seed-merge export
        >>> save_tokenizer(tok, "copy")
        >>> AutoTokenizer.from_pretrained("copy")("你好").input_ids[0] == tok.bos_token_id
        True
    """
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(
            f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
        )
    from llamazh._atomic import atomic_write_bytes, atomic_write_text
    from llamazh._files import read_json

    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if (
        isinstance(vocab_file, (str, os.PathLike))
        and Path(vocab_file).name == "tokenizer.model"
        and Path(vocab_file).is_file()
        and not (out / "tokenizer.model").exists()
    ):
        atomic_write_bytes(out / "tokenizer.model", Path(vocab_file).read_bytes())
    pattern = getattr(tokenizer, "special_tokens_pattern", None)
    config_path = out / "tokenizer_config.json"
    if pattern is not None and getattr(tokenizer, "sp_model", None) is not None:
        config = read_json(config_path, "a tokenizer config")
        if config.get("special_tokens_pattern") != pattern:
            config["special_tokens_pattern"] = pattern
            atomic_write_text(config_path, json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    return out
