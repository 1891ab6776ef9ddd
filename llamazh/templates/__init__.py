"""Exact prompt formats (Alpaca, Chinese-Alpaca-2, Llama-2-chat, Llama-3, ChatML) with SFT
encoding and chat-template export.

>>> from llamazh.templates import TEMPLATES, get_template
>>> t = get_template("llama3")
>>> text = t.render([{"role": "user", "content": "你好"}])
>>> ids, labels = t.encode(tokenizer, messages)          # labels: -100 except answers
>>> tokenizer.chat_template = t.to_jinja()               # apply_chat_template gives the same ids
"""

from llamazh.templates.core import ChatTemplate, Part, Special, validate_messages
from llamazh.templates.encoding import IGNORE_INDEX, Encoded, TooLongError, encode
from llamazh.templates.registry import TEMPLATES, get_template
from llamazh.templates.sft import (
    SFTBuild,
    alpaca_messages,
    build_sft_examples,
    record_messages,
    sharegpt_messages,
)

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "ChatTemplate",
    "Encoded",
    "Part",
    "SFTBuild",
    "Special",
    "TooLongError",
    "alpaca_messages",
    "build_sft_examples",
    "encode",
    "get_template",
    "record_messages",
    "sharegpt_messages",
    "validate_messages",
]
