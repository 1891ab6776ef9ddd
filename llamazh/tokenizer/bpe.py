"""Continued BPE training: extend a byte-level BPE tokenizer (Llama-3, Qwen2, SmolLM, ...) with
merges learned on new text, keeping every base id, merge and setting.

The new merges are learned on the text *as the base tokenizer sees it*: its normalizer and
pre-tokenizer (run by ``tokenizers``), then all of its merges (``model.tokenize`` once per
distinct pre-token), so each pre-token is a sequence of base tokens. Adjacent pairs are
counted, weighted by how often the pre-token occurs, and the most frequent pair becomes the
next merge, with counts updated incrementally (only the pre-tokens holding the pair are
touched). The merges are appended after the base ones, so ``tokenizers`` applies every base
merge first, exactly as the base does, then the new ones in the order they were learned; a new
merge makes a token the base vocabulary lacks, so no base merge can apply after it.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamazh._atomic import atomic_dir
from llamazh._checks import check_choice, check_positive_int
from llamazh.tokenizer._bytelevel import (
    BaseTokenizer,
    cjk_token,
    load_base,
    non_ascii_token,
    text_of,
    token_bytes,
)
from llamazh.tokenizer.merge import has_cjk

#: ``scope`` values of :func:`extend_bpe`.
BPE_SCOPES = ("cjk", "non_ascii", "all")


@dataclass(frozen=True)
class BPEExtension:
    """An extended byte-level BPE tokenizer and what was added.

    Attributes:
        tokenizer: the extended ``tokenizers.Tokenizer``.
        new_tokens: the added token strings (byte-level alphabet), in id order; their ids
            are ``base_vocab_size, base_vocab_size + 1, ...``.
        base_vocab_size: size of the base tokenizer, added/special tokens included.
        merges: the appended merges ``(left, right)``, in rank order (one per new token).
        base_merges: number of merges of the base.
        side_files: the base's configuration files (name -> bytes) that :meth:`save` copies.
    """

    tokenizer: Any = field(repr=False)
    new_tokens: tuple[str, ...] = field(repr=False)
    base_vocab_size: int
    merges: tuple[tuple[str, str], ...] = field(repr=False)
    base_merges: int
    side_files: dict[str, bytes] = field(repr=False, default_factory=dict)

    @property
    def vocab_size(self) -> int:
        """Size of the extended tokenizer (``base_vocab_size + len(new_tokens)``)."""
        return self.base_vocab_size + len(self.new_tokens)

    def new_token_text(self) -> list[str]:
        """Each new token decoded as UTF-8 (partial characters shown as U+FFFD)."""
        return [(token_bytes(t) or b"").decode("utf-8", "replace") for t in self.new_tokens]

    def reachability(self) -> tuple[float, list[str]]:
        """How many new tokens that decode to whole characters encode, alone, to themselves.

        Returns:
            ``(fraction, unreachable)``: the share over the new tokens that are valid UTF-8
            (partial-character tokens only occur inside longer text), and the texts of those
            that encode to something else (BPE can split a token's own text differently
            when an earlier merge crosses its halves).
        """
        whole, missed = 0, []
        for k, token in enumerate(self.new_tokens):
            try:
                text = (token_bytes(token) or b"").decode("utf-8")
            except UnicodeDecodeError:
                continue
            whole += 1
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            if ids != [self.base_vocab_size + k]:
                missed.append(text)
        return (1 - len(missed) / whole if whole else 1.0), missed

    def __str__(self) -> str:
        return (
            f"extended BPE: {self.base_vocab_size} base + {len(self.new_tokens)} new tokens = "
            f"{self.vocab_size} ({self.base_merges} + {len(self.merges)} merges)"
        )

    def save(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write a Hugging Face tokenizer directory, atomically, and return its path.

        ``tokenizer.json`` is the extended tokenizer; the base's ``tokenizer_config.json``,
        ``special_tokens_map.json`` and chat template files are copied unchanged (special
        tokens keep their ids, so they stay valid). A base without a configuration gets a
        minimal one (``PreTrainedTokenizerFast``), so ``AutoTokenizer.from_pretrained`` loads
        the directory either way.

        Raises:
            FileExistsError: ``out_dir`` exists and ``overwrite`` is false (nothing written).
        """
        out = Path(out_dir)
        if out.exists() and not overwrite:
            raise FileExistsError(
                f"out_dir={str(out)!r} already exists; choose a new directory or pass "
                "overwrite=True"
            )
        side = dict(self.side_files)
        if "tokenizer_config.json" not in side:
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "clean_up_tokenization_spaces": False,
            }
            side["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
        with atomic_dir(out, overwrite=overwrite) as tmp:
            self.tokenizer.save(str(tmp / "tokenizer.json"))
            for name, data in side.items():
                (tmp / name).write_bytes(data)
        return out


def extend_bpe(
    base: Any,
    texts: Iterable[str | os.PathLike[str]],
    *,
    new_tokens: int = 20000,
    min_frequency: int = 2,
    scope: str = "cjk",
    show_progress: bool = False,
) -> BPEExtension:
    """Learn ``new_tokens`` merges on ``texts`` and append them to byte-level BPE ``base``.

    Base ids, base merges and their order, added/special tokens (ids and flags), normalizer,
    pre-tokenizer, decoder, post-processor, ``ignore_merges`` and ``byte_fallback`` are kept;
    new tokens get the ids after the base's full size (added tokens included). ``scope``:

    * ``"cjk"`` (default): pairs are counted only in pre-tokens holding a CJK character
      (:func:`has_cjk`: ideographs, CJK and full-width punctuation), and only tokens that
      hold a CJK character or are a fragment of one (partial UTF-8) are learned: English,
      code and digits inside Chinese text, and punctuation runs such as `` “&`` or ``;”``,
      keep the base's tokens (``en_d2l`` encodes line for line identically).
    * ``"non_ascii"``: every pre-token counts, tokens must hold a non-ASCII byte: pure ASCII
      text encodes exactly as with the base, other scripts in the text are learned too.
    * ``"all"``: any pair (English words inside the new text can merge too).

    Text that spells a special token (``"<|im_end|>"``) is counted as ordinary text. On the
    bundled Chinese corpora (17,275 lines, 168,659 distinct pre-tokens) 20,000 merges take
    about 20-24 s of CPU time (``benchmarks/tokenizer_efficiency.py --part bpe``).

    Args:
        base: a tokenizer directory, a ``tokenizer.json`` path, a ``tokenizers.Tokenizer`` or
            a transformers fast tokenizer; byte-level BPE.
        texts: the training text: an iterable whose ``str`` items are texts and whose
            ``os.PathLike`` items (``Path``) are UTF-8 files, read one text per non-empty
            line. (A bare ``str`` is refused: it would be ambiguous.)
        new_tokens: how many tokens (and merges) to add; > 0.
        min_frequency: a pair must occur at least this often to become a merge.
        scope: ``"cjk"``, ``"non_ascii"`` or ``"all"``: which pairs may become merges.
        show_progress: print progress every 1,000 merges.

    Returns:
        A :class:`BPEExtension`: ``.tokenizer``, ``.new_tokens``, ``.save(out_dir)``.

    Raises:
        TypeError: ``base`` or ``texts`` is of the wrong kind.
        ValueError: ``base`` is not byte-level BPE; ``new_tokens``/``min_frequency``/``scope``
            is invalid; the text supports fewer than ``new_tokens`` merges (the message says
            how many it could learn).
        FileNotFoundError: a file in ``texts`` or ``base`` does not exist.

    Example:
        >>> ext = extend_bpe("smollm2-tokenizer", [Path("zh.txt")], new_tokens=20000)
        >>> print(ext)  # extended BPE: 49152 base + 20000 new tokens = 69152 (...)
        >>> ext.save("smollm2-zh-tokenizer")
    """
    check_positive_int("new_tokens", new_tokens)
    check_positive_int("min_frequency", min_frequency)
    check_choice("scope", scope, BPE_SCOPES)
    loaded = load_base(base, "base")
    lines = _text_lines(texts)
    words = _pre_token_counts(loaded.tokenizer, lines)
    if scope == "cjk":
        words = Counter({p: n for p, n in words.items() if has_cjk(text_of(p))})
    learned = _learn_merges(loaded, words, new_tokens, min_frequency, scope, show_progress)
    if len(learned) < new_tokens:
        raise ValueError(
            f"new_tokens={new_tokens} is more than this text supports: it has "
            f"{len(learned)} pairs occurring at least min_frequency={min_frequency} times "
            f"(scope={scope!r}); pass new_tokens<={len(learned)} or more text"
        )
    return _build(loaded, learned)


def _text_lines(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(
            "texts must be an iterable of texts (str) and/or files (pathlib.Path), got "
            f"{type(texts).__name__}; wrap a single file as [Path(file)]"
        )
    lines: list[str] = []
    for item in texts:
        if isinstance(item, str):
            lines.append(item)
        elif isinstance(item, os.PathLike):
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"texts: {str(path)!r} is not an existing file")
            try:
                content = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"texts: {str(path)!r} is not UTF-8 text ({exc})") from None
            lines.extend(ln for ln in content.splitlines() if ln.strip())
        else:
            raise TypeError(f"texts must hold str or pathlib.Path items, got {type(item).__name__}")
    if not any(lines):
        raise ValueError("texts holds no text to learn from")
    return lines


def _pre_token_counts(tok: Any, lines: list[str]) -> Counter[str]:
    """How often each pre-token occurs, as the base normalizes and pre-tokenizes."""
    norm, pre = tok.normalizer, tok.pre_tokenizer
    counts: Counter[str] = Counter()
    for line in lines:
        if norm is not None:
            line = norm.normalize_str(line)
        counts.update(piece for piece, _ in pre.pre_tokenize_str(line))
    return counts


def _learn_merges(
    loaded: BaseTokenizer,
    pre_tokens: Counter[str],
    limit: int,
    min_frequency: int,
    scope: str,
    show_progress: bool,
) -> list[tuple[int, int]]:
    """Greedy BPE on the base split of each pre-token; returns the merged id pairs in order.

    New symbols are numbered from ``len(strings)`` on (their order = merge order).
    """
    tok = loaded.tokenizer
    model = tok.model
    size = _full_size(loaded)
    strings = [tok.id_to_token(i) or "" for i in range(size)]
    taken = set(loaded.data["model"]["vocab"])
    taken |= {a["content"] for a in loaded.data.get("added_tokens", [])}
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, n in pre_tokens.items():
        ids = [t.id for t in model.tokenize(piece)]
        if len(ids) > 1:
            words.append(ids)
            freqs.append(n)

    # Pairs are keyed by one int, (left << _SHIFT) | right: cheaper to hash than tuples.
    pair_count: defaultdict[int, int] = defaultdict(int)
    where: defaultdict[int, set[int]] = defaultdict(set)  # a superset: may list stale words
    for wi, ids in enumerate(words):
        f = freqs[wi]
        for left, right in itertools.pairwise(ids):
            key = (left << _SHIFT) | right
            pair_count[key] += f
            where[key].add(wi)
    heap = [(-c, key) for key, c in pair_count.items()]
    heapq.heapify(heap)
    admit = {"cjk": cjk_token, "non_ascii": non_ascii_token, "all": None}[scope]
    merges: list[tuple[int, int]] = []
    while heap and len(merges) < limit:
        neg, key = heapq.heappop(heap)
        if pair_count.get(key, 0) != -neg:
            continue  # stale entry: the current count was pushed when it changed
        if -neg < min_frequency:
            break
        a, b = key >> _SHIFT, key & _MASK
        text = strings[a] + strings[b]
        del pair_count[key]
        if text in taken or (admit is not None and not admit(token_bytes(text) or b"")):
            continue  # never mergeable: forgotten for good
        new = len(strings)
        strings.append(text)
        taken.add(text)
        merges.append((a, b))
        # Each merge site is an edit of the current sequence: (l, a) b r -> (l, new) (new, r).
        # Done in place left to right, consecutive sites net out by themselves.
        delta: dict[int, int] = {}
        get = delta.get
        for wi in where.pop(key):
            w = words[wi]
            f = freqs[wi]
            j = -1
            while True:
                try:
                    j = w.index(a, j + 1)
                except ValueError:
                    break
                if j + 1 == len(w) or w[j + 1] != b:
                    continue
                if j > 0:
                    left = w[j - 1] << _SHIFT
                    k = left | a
                    delta[k] = get(k, 0) - f
                    k = left | new
                    delta[k] = get(k, 0) + f
                    where[k].add(wi)
                if j + 2 < len(w):
                    right = w[j + 2]
                    k = (b << _SHIFT) | right
                    delta[k] = get(k, 0) - f
                    k = (new << _SHIFT) | right
                    delta[k] = get(k, 0) + f
                    where[k].add(wi)
                w[j : j + 2] = [new]
        delta.pop(key, None)  # the merged pair itself (a == b: "a a a") is gone already
        for k, d in delta.items():
            if d:
                c = pair_count[k] + d
                if c > 0:
                    pair_count[k] = c
                    heapq.heappush(heap, (-c, k))
                else:
                    pair_count.pop(k, None)
        if show_progress and len(merges) % 1000 == 0:
            print(f"extend_bpe: {len(merges)}/{limit} merges, last count {-neg}")
    return merges


_SHIFT = 24
_MASK = (1 << _SHIFT) - 1


def _full_size(loaded: BaseTokenizer) -> int:
    """One past the largest id in use (model vocabulary and added tokens)."""
    ids = list(loaded.data["model"]["vocab"].values())
    ids += [a["id"] for a in loaded.data.get("added_tokens", [])]
    return max(ids) + 1


def _build(loaded: BaseTokenizer, learned: list[tuple[int, int]]) -> BPEExtension:
    from tokenizers import Tokenizer

    data = json.loads(json.dumps(loaded.data))
    model = data["model"]
    vocab, merges = model["vocab"], model["merges"]
    base_merges = len(merges)
    string_merges = bool(merges) and isinstance(merges[0], str)
    # tokenizers renumbers, on loading, added tokens the model vocabulary lacks (Llama-3's
    # specials sit after its 128,000 model ids) from the model's size on: once new tokens
    # follow them, they would move. Listed in the vocabulary too, they keep their ids; the
    # model never reaches them by merges, and the added vocabulary matches them first.
    for added in data.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    size = _full_size(loaded)
    strings = {i: loaded.tokenizer.id_to_token(i) for i in range(size)}
    new_tokens, pairs = [], []
    for k, (a, b) in enumerate(learned):
        left, right = strings[a], strings[b]
        token = left + right
        strings[size + k] = token
        vocab[token] = size + k
        merges.append(f"{left} {right}" if string_merges else [left, right])
        new_tokens.append(token)
        pairs.append((left, right))
    tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    return BPEExtension(
        tokenizer=tok,
        new_tokens=tuple(new_tokens),
        base_vocab_size=size,
        merges=tuple(pairs),
        base_merges=base_merges,
        side_files=dict(loaded.side_files),
    )
