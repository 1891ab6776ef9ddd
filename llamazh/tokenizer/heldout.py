"""The held-out protocol for Chinese vocabulary extension on the bundled corpora (issue 13).

Held out: the first tenth of the CJK-heavy lines of ``zh_d2l`` (at least 30% of a line's
characters are CJK ideographs) and the first 2,000 lines of ``zh_classical``; English
(``en_d2l``) is never trained on. Training text: every other line of the two Chinese files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: A line is CJK-heavy when at least this share of its characters are CJK ideographs.
CJK_HEAVY = 0.3
#: Lines of zh_classical held out (from the top).
CLASSICAL_HELD_OUT = 2000

_IDEOGRAPHS = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3FFFF))


def cjk_share(line: str) -> float:
    """Share of ``line``'s characters that are CJK ideographs (0.0 for an empty line).

    Example: ``cjk_share("深度学习 is") == 4 / 7``.
    """
    if not line:
        return 0.0
    n = sum(1 for ch in line if any(lo <= ord(ch) <= hi for lo, hi in _IDEOGRAPHS))
    return n / len(line)


@dataclass(frozen=True)
class HeldOutSplit:
    """Training lines and held-out text sets (each a tuple of non-empty lines).

    Attributes:
        train: the Chinese training lines (zh_d2l, then zh_classical).
        held_out: ``{"zh_d2l": ..., "zh_classical": ..., "en_d2l": ...}``.
    """

    train: tuple[str, ...] = field(repr=False)
    held_out: dict[str, tuple[str, ...]] = field(repr=False)

    def __str__(self) -> str:
        sets = ", ".join(f"{k} {len(v)}" for k, v in self.held_out.items())
        return f"held-out split: {len(self.train)} training lines; held out: {sets}"


def chinese_held_out_split(corpus_dir: str | os.PathLike[str] | None = None) -> HeldOutSplit:
    """Split the bundled corpora (``zh_d2l.txt``, ``zh_classical.txt``, ``en_d2l.txt``).

    Args:
        corpus_dir: directory holding the three files; ``None``: the bundled ``data/corpus``.

    Returns:
        A :class:`HeldOutSplit` (zh_d2l: 258 held out, 5,357 train; zh_classical: 2,000 held
        out, 11,918 train; en_d2l: 4,444 lines).

    Raises:
        FileNotFoundError: a corpus file is missing.

    Example:
        >>> split = chinese_held_out_split()
        >>> ext = extend_bpe("smollm2-tokenizer", split.train, new_tokens=20000)
        >>> encoding_efficiency({"ext": ext}, split.held_out)
    """
    if corpus_dir is None:
        from llamazh.testing import data_path

        found = data_path("corpus/zh_d2l.txt")
        if found is None:
            raise FileNotFoundError("the bundled data/corpus is not in this checkout")
        root = found.parent
    else:
        root = Path(corpus_dir)

    def lines(name: str) -> list[str]:
        path = root / f"{name}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"corpus_dir={str(root)!r} has no {name}.txt")
        return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]

    d2l, classical = lines("zh_d2l"), lines("zh_classical")
    heavy = [i for i, line in enumerate(d2l) if cjk_share(line) >= CJK_HEAVY]
    held = set(heavy[: len(heavy) // 10])
    train = [line for i, line in enumerate(d2l) if i not in held]
    train += classical[CLASSICAL_HELD_OUT:]
    return HeldOutSplit(
        train=tuple(train),
        held_out={
            "zh_d2l": tuple(d2l[i] for i in sorted(held)),
            "zh_classical": tuple(classical[:CLASSICAL_HELD_OUT]),
            "en_d2l": tuple(lines("en_d2l")),
        },
    )
