"""Encoding rendered conversations with a Hugging Face tokenizer, special tokens by id.

How our ids are defined (and why they equal ``apply_chat_template(tokenize=True)``):
the rendered conversation is a sequence of text segments separated by special tokens. Each
special token becomes its id (looked up, never parsed out of text: a message that contains the
string ``"</s>"`` stays text). Each text segment is tokenized the way the tokenizer's own
pipeline tokenizes that segment *inside the full string*: ``tokenizers`` splits added tokens
out first and then normalizes and pre-tokenizes every remaining segment on its own, so the
concatenation equals the tokenization of the rendered text. The one context-dependent step is
SentencePiece's dummy prefix: with ``Metaspace(prepend_scheme="first")`` (transformers'
default for Llama tokenizers, ``legacy=False``) only a segment at offset 0 of the string gets
``"▁"``, so ``<s>[INST]`` encodes ``[`` (29961); with ``prepend_scheme="always"``
(``legacy=True``, and SentencePiece itself) every segment gets it and ``<s>[INST]`` encodes ``▁[``
(518), which is what Meta and Chinese-Alpaca-2 trained on. We reproduce whichever the tokenizer
does; see docs/templates.md for which to load.

Labels: a token is labeled (keeps its id) iff its character span overlaps an assistant reply
(the reply text and its end token), which is transformers' ``{% generation %}`` rule; all other
positions are -100.
"""

from __future__ import annotations

import json
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llamazh._checks import check_choice, check_positive_int

if TYPE_CHECKING:
    from llamazh.templates.core import ChatTemplate

IGNORE_INDEX = -100
OVERFLOW_POLICIES = ("error", "drop_turns", "truncate")


class TooLongError(ValueError):
    """The conversation cannot be fitted into ``max_length`` without losing every answer."""


class Encoded(tuple):
    """``(input_ids, labels)``: a 2-tuple (lists of ints of equal length; -100 where not
    trained) that also carries what ``max_length`` did: ``dropped_messages`` (trailing messages
    removed by ``overflow="drop_turns"``) and ``truncated_tokens`` (cut by ``"truncate"``)."""

    dropped_messages: int
    truncated_tokens: int

    def __new__(
        cls,
        input_ids: list[int],
        labels: list[int],
        *,
        dropped_messages: int = 0,
        truncated_tokens: int = 0,
    ) -> Encoded:
        self = super().__new__(cls, (input_ids, labels))
        self.dropped_messages = dropped_messages
        self.truncated_tokens = truncated_tokens
        return self

    @property
    def input_ids(self) -> list[int]:
        return self[0]

    @property
    def labels(self) -> list[int]:
        return self[1]


def encode(
    template: ChatTemplate,
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    max_length: int | None = None,
    *,
    overflow: str = "error",
) -> Encoded:
    """Token ids and training labels for a conversation.

    Args:
        template: the prompt format.
        tokenizer: a fast (``tokenizers``-backed) transformers tokenizer that knows the
            template's special tokens as added tokens.
        messages: ``[{"role", "content"}, ...]`` with at least one assistant reply.
        max_length: longest allowed sequence (tokens), ``None`` for no limit.
        overflow: what to do when the encoding is longer than ``max_length``:
            ``"error"`` raise :class:`TooLongError`; ``"drop_turns"`` drop whole trailing
            exchanges until it fits (the result ends with an assistant reply and its end token);
            ``"truncate"`` cut at ``max_length`` like the seed scripts, which may cut the last
            answer short (and its end token off). Every policy raises :class:`TooLongError`
            rather than return an example with no labeled token.

    Returns:
        :class:`Encoded`, the tuple ``(input_ids, labels)``: lists of ints of equal length ``S``;
        labels are -100 except on assistant replies and their end tokens. The ids contain the
        template's BOS once (``add_special_tokens`` is never applied on top).

    Raises:
        ValueError/TypeError: bad messages (see ``validate_messages``), no assistant reply, a
            special token the tokenizer lacks, unknown ``overflow``.
        TooLongError: nothing trainable fits in ``max_length``.

    Example::

        >>> ids, labels = get_template("alpaca2").encode(tok, [
        ...     {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}])
    """
    check_choice("overflow", overflow, OVERFLOW_POLICIES)
    if max_length is not None:
        check_positive_int("max_length", max_length)
    if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages or ()):
        template.parts(messages, add_generation_prompt=False)  # the clearer error, if any
        raise ValueError("messages has no assistant reply: encode needs something to train on")
    ids, labels = _encode_parts(template, tokenizer, messages)
    if max_length is None or len(ids) <= max_length:
        return Encoded(ids, labels)
    if overflow == "error":
        raise TooLongError(
            f"encoding has {len(ids)} tokens > max_length={max_length}; pass "
            f"overflow='drop_turns' or 'truncate', or drop the example"
        )
    if overflow == "truncate":
        first_answer = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)
        if first_answer >= max_length:
            raise TooLongError(
                f"max_length={max_length} would cut every answer token (the first answer "
                f"starts at token {first_answer} of {len(ids)})"
            )
        cut = len(ids) - max_length
        return Encoded(ids[:max_length], labels[:max_length], truncated_tokens=cut)
    # drop_turns: the longest prefix of messages ending with an assistant reply that fits
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    for end in reversed([e for e in ends if e < len(messages)]):
        ids, labels = _encode_parts(template, tokenizer, messages[:end])
        if len(ids) <= max_length:
            return Encoded(ids, labels, dropped_messages=len(messages) - end)
    raise TooLongError(f"even the first exchange needs {len(ids)} tokens > max_length={max_length}")


def _encode_parts(
    template: ChatTemplate, tokenizer: Any, messages: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[int]]:
    first, rest = _segment_tokenizers(tokenizer)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []  # per token, (start, end) in the rendered text
    assistant: list[tuple[int, int]] = []  # character spans of assistant replies
    pos = 0
    text: list[str] = []

    def flush() -> None:
        nonlocal pos
        if not text:
            return
        segment = "".join(text)
        enc = (first if pos == 0 else rest).encode(segment, add_special_tokens=False)
        ids.extend(enc.ids)
        spans.extend((pos + a, pos + b) for a, b in enc.offsets)
        pos += len(segment)
        text.clear()

    for part in template.parts(messages, add_generation_prompt=False):
        start = pos + sum(map(len, text))
        if part.assistant:
            if assistant and assistant[-1][1] == start:
                assistant[-1] = (assistant[-1][0], start + len(part.text))
            else:
                assistant.append((start, start + len(part.text)))
        if part.special:
            flush()
            ids.append(special_token_id(tokenizer, part.text, template=template.name))
            spans.append((pos, pos + len(part.text)))
            pos += len(part.text)
        else:
            text.append(part.text)
    flush()
    # a token is trained iff its span overlaps a reply (transformers' generation-mask rule);
    # tokens and replies are both in text order, so one sweep does it
    labels = [IGNORE_INDEX] * len(ids)
    r = 0
    for k, (s, e) in enumerate(spans):
        while r < len(assistant) and assistant[r][1] <= s:
            r += 1
        if r < len(assistant) and assistant[r][0] < max(e, s + 1):
            labels[k] = ids[k]
    return ids, labels


def special_token_id(tokenizer: Any, token: str, *, template: str = "template") -> int:
    """The id of ``token``, which must be an added (special) token of ``tokenizer`` so that the
    exported chat template's text maps to the same single id."""
    added = getattr(tokenizer, "added_tokens_encoder", None)
    if added is None or token not in added:
        raise ValueError(
            f"template {template!r} needs {token!r} as an added/special token of the tokenizer, "
            f"which does not have it; add it with tokenizer.add_special_tokens("
            f"{{'additional_special_tokens': [{token!r}]}}) (and resize the embeddings)"
        )
    token_id = int(added[token])
    spec = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    if spec is not None and (getattr(spec, "lstrip", False) or getattr(spec, "rstrip", False)):
        raise ValueError(
            f"the tokenizer's {token!r} has lstrip/rstrip set: it swallows the whitespace next "
            f"to it, so template {template!r} would not render what it encodes; load the "
            f"tokenizer with that token as AddedToken({token!r}, lstrip=False, rstrip=False)"
        )
    return token_id


# tokenizer -> (vocab size incl. added tokens, encoder for a segment at offset 0, for later ones)
_CACHE: weakref.WeakKeyDictionary[Any, tuple[int, Any, Any]] = weakref.WeakKeyDictionary()


def _segment_tokenizers(tokenizer: Any) -> tuple[Any, Any]:
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        if _is_sentencepiece_backend(tokenizer):
            segments = _SentencePieceSegments(tokenizer.sp_model)
            return segments, segments
        raise TypeError(
            f"encode needs a fast (tokenizers-backed) transformers tokenizer or a "
            f"SentencePieceBackend (legacy=True) to reproduce apply_chat_template exactly; "
            f"got {type(tokenizer).__name__}"
        )
    cached = _CACHE.get(tokenizer)
    # the copies are rebuilt if the tokenizer gained tokens since (add_special_tokens)
    if cached is not None and cached[0] == backend.get_vocab_size(with_added_tokens=True):
        return cached[1], cached[2]
    spec = json.loads(backend.to_str())
    if _prepends_first_only(spec.get("pre_tokenizer")):
        warnings.warn(
            f"{type(tokenizer).__name__} adds SentencePiece's dummy prefix only at the start of "
            f"the text (Metaspace prepend_scheme='first', transformers' legacy=False): after a "
            f"special token, '<s>[INST]' encodes '[' where Meta's Llama-2-chat and "
            f"Chinese-Alpaca-2 were trained on '▁['. llamazh reproduces this tokenizer (as "
            f"apply_chat_template does); to match those models load it with legacy=True or use "
            f"llamazh.tokenizer.export_hf_tokenizer",
            UserWarning,
            stacklevel=5,
        )
    encoders = []
    for later in (False, True):
        s = json.loads(json.dumps(spec))
        if later:
            _never_prepend(s.get("pre_tokenizer"))
        enc = Tokenizer.from_str(json.dumps(s))
        enc.no_truncation()
        enc.no_padding()
        # special tokens inside message text stay text; the template inserts its own by id
        enc.encode_special_tokens = True
        encoders.append(enc)
    _CACHE[tokenizer] = (backend.get_vocab_size(with_added_tokens=True), *encoders)
    return encoders[0], encoders[1]


def _is_sentencepiece_backend(tokenizer: Any) -> bool:
    import sentencepiece as spm

    sp = getattr(tokenizer, "sp_model", None)
    return isinstance(sp, spm.SentencePieceProcessor) and getattr(tokenizer, "legacy", True)


class _SentencePieceSegments:
    """``encode(text) -> (ids, char offsets)`` by sentencepiece, as ``SentencePieceBackend``
    (legacy) encodes each stretch of text between special tokens: dummy prefix on each."""

    def __init__(self, sp: Any) -> None:
        self.sp = sp

    def encode(self, text: str, add_special_tokens: bool = False) -> Any:
        from types import SimpleNamespace

        starts = [0]  # byte offset -> char offset, through the byte offset of each char
        for ch in text:
            starts.append(starts[-1] + len(ch.encode("utf-8")))
        char_of = {b: c for c, b in enumerate(starts)}
        try:
            pieces = self.sp.encode(text, return_type="proto").pieces
        except TypeError:  # sentencepiece before return_type
            pieces = self.sp.encode(text, out_type="immutable_proto").pieces
        ids = [p.id for p in pieces]
        offsets = [(char_of.get(p.begin, 0), char_of.get(p.end, len(text))) for p in pieces]
        return SimpleNamespace(ids=ids, offsets=offsets)


def _prepends_first_only(node: Any) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
        return True
    return any(_prepends_first_only(child) for child in node.get("pretokenizers", ()) or ())


def _never_prepend(node: Any) -> None:
    """Turn ``Metaspace(prepend_scheme="first")`` into "never": what a segment that does not
    start the string gets (tokenizers prepends only at original offset 0)."""
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"] = "never"
        for child in node.get("pretokenizers", ()) or ():
            _never_prepend(child)
