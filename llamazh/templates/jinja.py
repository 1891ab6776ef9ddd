"""Writing a :class:`~llamazh.templates.core.ChatTemplate` as a transformers ``chat_template``.

The Jinja mirrors ``ChatTemplate.parts`` step by step. Every literal is emitted through a
``{{ '...' }}`` expression and every tag carries ``-`` whitespace control, so the output does not
depend on the environment's ``trim_blocks``/``lstrip_blocks`` settings. Special tokens are written
as their literal strings (e.g. ``'</s>'``); the tokenizer must know them as added tokens so that
``apply_chat_template(tokenize=True)`` maps them to single ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamazh.templates.core import ChatTemplate, Piece

_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _literal(text: str) -> str:
    """A Jinja string literal for ``text``."""
    return "'" + "".join(_ESCAPES.get(c, c) for c in text) + "'"


def _expr(pieces: tuple[Piece, ...], content: str | None) -> str:
    """A Jinja expression joining ``pieces``, ``{content}`` becoming the variable ``content``."""
    from llamazh.templates.core import Special

    terms: list[str] = []
    for piece in pieces:
        if isinstance(piece, Special):
            terms.append(_literal(piece.token))
            continue
        chunks = piece.split("{content}")
        for j, chunk in enumerate(chunks):
            if j > 0:
                if content is None:
                    raise ValueError(f"piece {piece!r} uses {{content}} where no content exists")
                terms.append(content)
            if chunk:
                terms.append(_literal(chunk))
    return " + ".join(terms) if terms else "''"


def _emit(pieces: tuple[Piece, ...], content: str | None = None) -> str:
    return "{{- " + _expr(pieces, content) + " -}}" if pieces else ""


def _raise(message: str) -> str:
    return "{{- raise_exception(" + _literal(message) + ") -}}"


def to_jinja(template: ChatTemplate) -> str:
    """The ``chat_template`` string for ``template`` (see ``ChatTemplate.to_jinja``)."""
    t = template
    default = "none" if t.default_system is None else _literal(t.default_system)
    clean = " | trim" if t.strip else ""
    lines = [
        f"{{#- llamazh chat template {t.name!r}: {t.description.replace('#}', '# }')} -#}}",
        "{%- if messages | length == 0 -%}"
        + _raise("messages must not be empty")
        + "{%- endif -%}",
        "{%- if messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}",
        f"{{%- set system = {default} -%}}{{%- set loop_messages = messages -%}}",
        "{%- endif -%}",
        "{%- if loop_messages | length == 0 -%}"
        + _raise("messages holds only a system message")
        + "{%- endif -%}",
        _emit(t.prefix),
    ]
    if t.system is not None:
        lines += [
            "{%- if system is not none -%}",
            f"{{%- set content = system{clean} -%}}",
            _emit(t.system, "content"),
            "{%- endif -%}",
        ]
    lines += [
        "{%- for message in loop_messages -%}",
        "{%- if message['role'] not in ['user', 'assistant'] -%}"
        + _raise("roles must be user or assistant after an optional leading system message")
        + "{%- endif -%}",
        "{%- if loop.first and message['role'] != 'user' -%}"
        + _raise("the first turn must be a user message")
        + "{%- endif -%}",
        "{%- if not loop.first and message['role'] == 'assistant' "
        "and loop.previtem['role'] == 'assistant' -%}"
        + _raise("two assistant turns in a row")
        + "{%- endif -%}",
    ]
    if t.alternate:
        lines.append(
            "{%- if not loop.first and message['role'] == 'user' "
            "and loop.previtem['role'] == 'user' -%}"
            + _raise("two user turns in a row: user and assistant turns must alternate")
            + "{%- endif -%}"
        )
    lines += ["{%- if message['role'] == 'user' -%}", "{%- set content = message['content'] -%}"]
    if t.system is None and t.system_fold:
        before, _, after = t.system_fold.partition("{content}")
        lines.append(
            "{%- if loop.first and system is not none -%}"
            f"{{%- set content = {_literal(before)} + system + {_literal(after)} + content -%}}"
            "{%- endif -%}"
        )
    if t.strip:
        lines.append("{%- set content = content | trim -%}")
    lines += [
        _emit(t.user, "content"),
        "{%- else -%}",
        f"{{%- set content = message['content']{clean} -%}}",
        _emit(t.assistant_prompt),
        "{%- generation -%}"
        + (
            "{%- if content -%}{{- " + _literal(t.assistant_lead) + " -}}{%- endif -%}"
            if t.assistant_lead
            else ""
        )
        + _emit(t.assistant, "content")
        + "{%- endgeneration -%}"
        + _emit(t.assistant_suffix),
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "{%- if loop_messages[-1]['role'] == 'assistant' -%}"
        + _raise("add_generation_prompt after an assistant reply")
        + "{%- endif -%}",
        _emit(t.assistant_prompt),
        "{%- endif -%}",
    ]
    return "\n".join(line for line in lines if line)
