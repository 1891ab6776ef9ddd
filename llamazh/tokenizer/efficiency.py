"""Encoding efficiency: tokens per character, characters per token, byte-fallback rate."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamazh.tokenizer._sources import as_view


@dataclass(frozen=True)
class EfficiencyRow:
    """One tokenizer on one text set. Counts exclude BOS/EOS; chars are Unicode code points."""

    tokenizer: str
    texts: str
    lines: int
    chars: int
    tokens: int
    byte_tokens: int

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.chars if self.chars else float("nan")

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else float("nan")

    @property
    def byte_fallback_rate(self) -> float:
        """Fraction of the tokens that are byte-fallback pieces (``<0xE4>``...)."""
        return self.byte_tokens / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class EfficiencyReport:
    """Rows for every (tokenizer, text set); ``.table()`` prints, ``.as_dict()`` is data."""

    rows: tuple[EfficiencyRow, ...]

    def get(self, tokenizer: str, texts: str) -> EfficiencyRow:
        for row in self.rows:
            if row.tokenizer == tokenizer and row.texts == texts:
                return row
        raise KeyError((tokenizer, texts))

    def as_dict(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{tokenizer: {texts: {tokens_per_char, chars_per_token, byte_fallback_rate,
        tokens, chars, lines, relative_tokens}}}``; ``relative_tokens`` is the token count
        over the first tokenizer's on the same texts."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for row in self.rows:
            out.setdefault(row.tokenizer, {})[row.texts] = {
                "tokens_per_char": row.tokens_per_char,
                "chars_per_token": row.chars_per_token,
                "byte_fallback_rate": row.byte_fallback_rate,
                "tokens": row.tokens,
                "chars": row.chars,
                "lines": row.lines,
                "relative_tokens": self._relative(row),
            }
        return out

    def _relative(self, row: EfficiencyRow) -> float:
        first = next(r for r in self.rows if r.texts == row.texts)
        return row.tokens / first.tokens if first.tokens else float("nan")

    def table(self) -> str:
        """A fixed-width table, one line per (texts, tokenizer); ``vs first`` is the token
        count relative to the first tokenizer on the same texts."""
        head = ("texts", "tokenizer", "tokens/char", "chars/token", "byte-fallback", "vs first")
        body = [
            (
                r.texts,
                r.tokenizer,
                f"{r.tokens_per_char:.4f}",
                f"{r.chars_per_token:.3f}",
                f"{100 * r.byte_fallback_rate:.2f}%",
                f"{self._relative(r):.3f}x",
            )
            for r in sorted(self.rows, key=lambda r: self._text_order(r.texts))
        ]
        widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]

        def fmt(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(head), rule, *(fmt(b) for b in body)])

    def _text_order(self, texts: str) -> int:
        names = list(dict.fromkeys(r.texts for r in self.rows))
        return names.index(texts)


def encoding_efficiency(tokenizers: Any, texts: Any) -> EfficiencyReport:
    """Measure how many tokens each tokenizer spends on each text set.

    Args:
        tokenizers: ``{name: tokenizer}`` or a list of tokenizers (named after the file stem,
            else ``tokenizer0``, ...). A tokenizer is a SentencePiece model (path, bytes,
            ``ModelProto``, ``MergeResult``, ``SentencePieceProcessor``, measured with
            sentencepiece itself), a Hugging Face tokenizer (``tokenizers.Tokenizer``, a
            transformers tokenizer, a tokenizer directory or ``tokenizer.json`` path) or a
            :class:`BPEExtension`.
        texts: ``{name: list of strings or a path}`` or a list of paths (named by stem). A
            file is read as UTF-8, one text per non-empty line.

    Returns:
        An :class:`EfficiencyReport`: ``.table()`` and ``.as_dict()``.

    Raises:
        TypeError / ValueError: a tokenizer or text set is not one of the accepted kinds,
            or a text set is empty.

    Example:
        >>> report = encoding_efficiency({"llama2": "llama2.model"}, ["zh_d2l.txt"])
        >>> report.get("llama2", "zh_d2l").tokens_per_char  # 0.462
    """
    named_tok = _named(tokenizers, "tokenizers", lambda v, i: _stem(v, f"tokenizer{i}"))
    named_text = _named(texts, "texts", lambda v, i: _stem(v, f"texts{i}"))
    corpora = {name: _lines(value, name) for name, value in named_text.items()}
    rows = []
    for tname, tvalue in named_tok.items():
        view = as_view(tvalue, f"tokenizers[{tname!r}]")
        for cname, lines in corpora.items():
            ids = view.encode(lines)
            rows.append(
                EfficiencyRow(
                    tokenizer=tname,
                    texts=cname,
                    lines=len(lines),
                    chars=sum(len(line) for line in lines),
                    tokens=sum(len(x) for x in ids),
                    byte_tokens=sum(1 for x in ids for i in x if i in view.byte_ids),
                )
            )
    return EfficiencyReport(tuple(rows))


def _named(value: Any, arg: str, default_name: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        items = dict(value)
    elif isinstance(value, (str, os.PathLike)) or not isinstance(value, Iterable):
        items = {default_name(value, 0): value}
    else:
        items = {}
        for i, v in enumerate(value):
            name = default_name(v, i)
            items[name if name not in items else f"{name}{i}"] = v
    if not items:
        raise ValueError(f"{arg} is empty; pass at least one")
    return items


def _stem(value: Any, fallback: str) -> str:
    return Path(value).stem if isinstance(value, (str, os.PathLike)) else fallback


def _lines(value: Any, name: str) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"texts[{name!r}]={str(path)!r} is not an existing file")
        try:
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError as exc:
            raise ValueError(f"texts[{name!r}]={str(path)!r} is not UTF-8 text ({exc})") from None
    elif isinstance(value, Iterable):
        lines = list(value)
        if not all(isinstance(x, str) for x in lines):
            raise TypeError(f"texts[{name!r}] must be a path or a list of str")
    else:
        raise TypeError(f"texts[{name!r}] must be a path or a list of str, got {value!r}")
    if not lines:
        raise ValueError(f"texts[{name!r}] holds no text")
    return lines
