"""Supervised fine-tuning examples from Alpaca-style records and ShareGPT-style conversations."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llamazh.templates.core import ChatTemplate
from llamazh.templates.encoding import TooLongError, encode
from llamazh.templates.registry import get_template

# ShareGPT "from" values seen in the wild -> our roles
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


def alpaca_messages(record: Mapping[str, Any], *, system: str | None = None) -> list[dict]:
    """Messages for an Alpaca record ``{"instruction", "input"?, "output"}``.

    A non-empty ``input`` is joined to the instruction with ``"\\n"`` (what Chinese-Alpaca
    v1/v2/v3 did for every format). ``system`` adds a system message (else the template's
    default system prompt applies).

    Raises:
        TypeError/ValueError: missing ``instruction``/``output`` or non-string fields.

    Example::

        >>> alpaca_messages({"instruction": "翻译", "input": "hello", "output": "你好"})
        [{'role': 'user', 'content': '翻译\\nhello'}, {'role': 'assistant', 'content': '你好'}]
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"record must be a dict, got {type(record).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise TypeError(f"record[{key!r}] must be a str, got {record.get(key)!r}")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise TypeError(f"record['input'] must be a str or None, got {extra!r}")
    instruction = record["instruction"] + ("\n" + extra if extra else "")
    messages = [] if system is None else [{"role": "system", "content": system}]
    return [
        *messages,
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": record["output"]},
    ]


def sharegpt_messages(record: Mapping[str, Any] | list) -> list[dict]:
    """Messages for a ShareGPT conversation ``{"conversations": [{"from", "value"}, ...]}`` (a
    bare list of turns is accepted too; a top-level ``"system"`` string becomes the system
    message). Roles: ``human``/``user`` -> user, ``gpt``/``assistant``/``chatgpt``/``bard``/
    ``bing``/``model`` -> assistant, ``system`` -> system.

    Raises:
        ValueError: unknown ``from`` value (lists the accepted ones); TypeError: bad shapes.

    Example::

        >>> sharegpt_messages({"conversations": [{"from": "human", "value": "hi"},
        ...                                      {"from": "gpt", "value": "hello"}]})
        [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
    """
    system = None
    turns = record
    if isinstance(record, Mapping):
        turns = record.get("conversations")
        system = record.get("system")
    if not isinstance(turns, list):
        raise TypeError(f"record['conversations'] must be a list of turns, got {turns!r}")
    messages = [] if not system else [{"role": "system", "content": system}]
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise TypeError(f"conversations[{i}] must be a dict with 'from' and 'value'")
        who = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(who.lower() if isinstance(who, str) else who)
        if role is None:
            known = ", ".join(repr(k) for k in SHAREGPT_ROLES)
            raise ValueError(f"conversations[{i}]['from'] must be one of {known}; got {who!r}")
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise TypeError(f"conversations[{i}]['value'] must be a str, got {value!r}")
        messages.append({"role": role, "content": value})
    return messages


def record_messages(record: Any) -> list[dict]:
    """Messages from a record in any supported layout: Alpaca (``instruction``), ShareGPT
    (``conversations``), or chat (``messages``, or already a list of role/content dicts)."""
    if isinstance(record, Mapping):
        if "instruction" in record:
            return alpaca_messages(record)
        if "conversations" in record:
            return sharegpt_messages(record)
        if "messages" in record:
            return list(record["messages"])
    if isinstance(record, list) and all(isinstance(m, Mapping) and "role" in m for m in record):
        return list(record)
    raise ValueError(
        "record must be an Alpaca record (instruction/input/output), a ShareGPT record "
        f"(conversations), or a chat (messages); got {str(record)[:80]!r}"
    )


@dataclass(frozen=True)
class SFTBuild:
    """Result of :func:`build_sft_examples`: ``examples`` (dicts with ``input_ids`` and
    ``labels``), ``skipped`` (indices of records that could not fit ``max_length``) and
    ``shortened`` (indices whose later turns were dropped or whose tokens were truncated)."""

    examples: list[dict]
    skipped: tuple[int, ...]
    shortened: tuple[int, ...]


def build_sft_examples(
    template: str | ChatTemplate,
    tokenizer: Any,
    records: Iterable[Any],
    *,
    max_length: int | None = None,
    overflow: str = "drop_turns",
) -> SFTBuild:
    """Encode a dataset of Alpaca / ShareGPT / chat records for supervised fine-tuning.

    Records that cannot fit ``max_length`` under ``overflow`` (see
    :func:`llamazh.templates.encode`) are skipped and reported, never silently cut to nothing;
    any other bad record raises with its index.

    Returns:
        :class:`SFTBuild`.

    Example::

        >>> out = build_sft_examples("alpaca2", tok, [{"instruction": "hi", "output": "你好"}],
        ...                          max_length=512)
        >>> out.examples[0]["labels"][-1] == tok.eos_token_id
        True
    """
    template = get_template(template)
    examples, skipped, shortened = [], [], []
    for index, record in enumerate(records):
        try:
            messages = record_messages(record)
            enc = encode(template, tokenizer, messages, max_length, overflow=overflow)
        except TooLongError:
            skipped.append(index)
            continue
        except (TypeError, ValueError) as err:
            raise type(err)(f"records[{index}]: {err}") from err
        if enc.dropped_messages or enc.truncated_tokens:
            shortened.append(index)
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return SFTBuild(examples, tuple(skipped), tuple(shortened))
