"""The chat-template data type, message validation, rendering and Jinja export.

A template is pure data (:class:`ChatTemplate`): tuples of text pieces and :class:`Special`
tokens, with ``{content}`` standing for a message's text. Rendering walks the messages once and
produces a list of :class:`Part` (text or special token, and whether it belongs to an assistant
reply); :meth:`ChatTemplate.render` joins them into a string, ``encode`` tokenizes them (see
``llamazh.templates.encoding``), and :meth:`ChatTemplate.to_jinja` writes the same walk as a
transformers ``chat_template``. One description, three consumers: they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamazh.templates.encoding import Encoded

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Special:
    """A special token, inserted by id when encoding and never parsed out of message text."""

    token: str


Piece = str | Special


@dataclass(frozen=True)
class Part:
    """One rendered piece: ``text`` is literal text or, if ``special``, a special token's string.
    ``assistant`` marks the pieces of an assistant reply (its text and its end token): the ones
    that get labels when encoding and sit inside ``{% generation %}`` in the Jinja export."""

    text: str
    special: bool = False
    assistant: bool = False


@dataclass(frozen=True)
class ChatTemplate:
    """A prompt format as data.

    Rendering a conversation ``[system?] user assistant user ...``:
    ``prefix``, then the system block (``system`` with the system text as ``{content}``; or, if
    ``system`` is ``None`` and ``system_fold`` is set, ``system_fold`` with the system text
    prepended to the first user message's content), then per message ``user`` or
    ``assistant_prompt`` + ``assistant`` (the latter labeled) + ``assistant_suffix`` (not
    labeled: ChatML's newline after ``<|im_end|>``), then ``assistant_prompt`` if a
    generation prompt is asked for; ``assistant_lead`` goes before a reply only when the reply
    is not empty (Chinese-Alpaca-2's ``" " + answer``). Without a system message
    ``default_system`` is used (``None``: no system block). ``strip``: message contents (after
    folding) are ``str.strip()``-ed as Meta's reference code does. ``alternate``: user and
    assistant turns must alternate.
    """

    name: str
    description: str
    prefix: tuple[Piece, ...]
    user: tuple[Piece, ...]
    assistant: tuple[Piece, ...]
    stop_tokens: tuple[str, ...]
    assistant_prompt: tuple[Piece, ...] = ()
    assistant_lead: str = ""
    assistant_suffix: tuple[Piece, ...] = ()
    system: tuple[Piece, ...] | None = None
    system_fold: str | None = None
    default_system: str | None = None
    strip: bool = False
    alternate: bool = True

    # ------------------------------------------------------------------ rendering
    def parts(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool
    ) -> list[Part]:
        """The rendered conversation as a list of :class:`Part` (validates ``messages``)."""
        validate_messages(messages, alternate=self.alternate, name=self.name)
        if add_generation_prompt and messages[-1]["role"] == "assistant":
            raise ValueError(
                "add_generation_prompt=True but the conversation already ends with an assistant "
                "reply; pass add_generation_prompt=False to render a complete conversation"
            )
        system = self.default_system
        body = list(messages)
        if messages[0]["role"] == "system":
            system, body = messages[0]["content"], body[1:]
        out: list[Part] = []
        _emit(out, self.prefix, "")
        if system is not None and self.system is not None:
            _emit(out, self.system, self._clean(system))
        for i, message in enumerate(body):
            content = message["content"]
            if message["role"] == "user":
                if i == 0 and system is not None and self.system is None and self.system_fold:
                    content = self.system_fold.replace("{content}", system) + content
                _emit(out, self.user, self._clean(content))
            else:
                _emit(out, self.assistant_prompt, "")
                content = self._clean(content)
                if content and self.assistant_lead:
                    out.append(Part(self.assistant_lead, assistant=True))
                _emit(out, self.assistant, content, assistant=True)
                _emit(out, self.assistant_suffix, "")
        if add_generation_prompt:
            _emit(out, self.assistant_prompt, "")
        return out

    def _clean(self, content: str) -> str:
        return content.strip() if self.strip else content

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``messages`` to the exact prompt text (special tokens as their strings).

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            add_generation_prompt: append what precedes an assistant reply (the conversation
                must then end with a user message).

        Raises:
            ValueError: empty conversation, unknown role, system message not first, two
                assistant turns in a row, non-alternating turns where the format needs them.
            TypeError: a message that is not a mapping with string ``role`` and ``content``.

        Example::

            >>> get_template("llama2-chat").render([{"role": "user", "content": " 你好 "}])
            '<s>[INST] 你好 [/INST]'
        """
        return "".join(p.text for p in self.parts(messages, add_generation_prompt))

    def encode(
        self,
        tokenizer: Any,
        messages: Sequence[Mapping[str, Any]],
        max_length: int | None = None,
        *,
        overflow: str = "error",
    ) -> Encoded:
        """Token ids and labels for supervised fine-tuning; see :func:`llamazh.templates.encode`."""
        from llamazh.templates.encoding import encode

        return encode(self, tokenizer, messages, max_length, overflow=overflow)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids of the tokens that end an assistant reply (for ``generate(eos_token_id=...)``)."""
        from llamazh.templates.encoding import special_token_id

        return [special_token_id(tokenizer, t, template=self.name) for t in self.stop_tokens]

    def to_jinja(self) -> str:
        """A transformers ``chat_template`` that renders exactly like :meth:`render`.

        Assistant replies (and their end token) are wrapped in ``{% generation %}`` so that
        ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly the
        tokens that :meth:`encode` labels. Invalid conversations raise through
        ``raise_exception`` with the same rules as :meth:`render`.

        Example::

            >>> tokenizer.chat_template = get_template("llama3").to_jinja()
        """
        from llamazh.templates.jinja import to_jinja

        return to_jinja(self)


def _emit(
    out: list[Part], pieces: tuple[Piece, ...], content: str, assistant: bool = False
) -> None:
    for piece in pieces:
        if isinstance(piece, Special):
            out.append(Part(piece.token, special=True, assistant=assistant))
        elif piece:
            text = piece.replace("{content}", content)
            if text:
                out.append(Part(text, assistant=assistant))


def validate_messages(
    messages: Sequence[Mapping[str, Any]], *, alternate: bool = True, name: str = "template"
) -> None:
    """Check a conversation; raise ``ValueError``/``TypeError`` naming the message at fault.

    Rules: at least one message besides an optional leading system message; roles are
    ``system``, ``user``, ``assistant``; ``system`` only first; the first turn after it is a
    user turn; never two assistant turns in a row; with ``alternate`` (Llama-2 and Alpaca
    formats) never two user turns in a row either.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
            f"got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError("messages must not be empty: an empty conversation cannot be rendered")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(
                f"messages[{i}]['role'] must be one of {', '.join(map(repr, ROLES))}; got {role!r}"
            )
        if not isinstance(content, str):
            raise TypeError(
                f"messages[{i}]['content'] must be a str, "
                f"got {type(content).__name__} ({content!r})"
            )
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}] is a system message; only messages[0] may be one")
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise ValueError("messages holds only a system message; add at least one user message")
    if messages[start]["role"] != "user":
        raise ValueError(
            f"messages[{start}] must be a user message (the first turn), "
            f"got role {messages[start]['role']!r}"
        )
    for i in range(start + 1, len(messages)):
        prev, role = messages[i - 1]["role"], messages[i]["role"]
        if prev == role == "assistant":
            raise ValueError(
                f"messages[{i - 1}] and messages[{i}] are two assistant turns in a row"
            )
        if alternate and prev == role == "user":
            raise ValueError(
                f"messages[{i - 1}] and messages[{i}] are two user turns in a row; the "
                f"{name!r} format needs user and assistant turns to alternate"
            )
