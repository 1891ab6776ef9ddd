"""Evaluation for any causal LM: bits per character (tokenizer-independent), perplexity by
length and passkey retrieval.

Model-agnostic on purpose (it lives beside, not inside, :mod:`llamazh.rope`): anything called
as ``model(input_ids=(B, S) LongTensor)`` returning an object with ``.logits`` ``(B, S, V)`` (a
transformers causal LM, patched or not) can be measured.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from llamazh._checks import check_positive_int, check_texts

__all__ = [
    "bits_per_char",
    "context_windows",
    "document_boundary",
    "passkey_retrieval_accuracy",
    "perplexity_by_length",
]


def _device_of(model: Any, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _lengths(lengths: Sequence[int]) -> list[int]:
    if isinstance(lengths, int) or not len(lengths):
        raise ValueError(f"lengths must be a non-empty sequence of ints, got lengths={lengths!r}")
    return [check_positive_int("lengths[i]", n, minimum=2) for n in lengths]


@torch.no_grad()
def perplexity_by_length(
    model: Any,
    token_ids: torch.Tensor | Sequence[int],
    lengths: Sequence[int],
    *,
    max_windows: int = 8,
    score_last: int | None = None,
    device: torch.device | str | None = None,
) -> dict[int, float]:
    """Perplexity of ``model`` on windows of each length cut from one token stream.

    The stream is cut into consecutive blocks of ``max(lengths)`` tokens (at most
    ``max_windows``). For each ``L`` in ``lengths``, every block gives one window: its last
    ``L`` tokens. Windows of every length therefore end at the same tokens, so the lengths are
    compared on the same text (with ``score_last``, on exactly the same predicted tokens; only
    the context they see differs). Each window is scored in one forward pass without a cache;
    the perplexity is ``exp(mean token NLL)`` over the scored tokens (fp32 log-softmax).

    Args:
        model: a causal LM (``model(input_ids=...).logits``), in eval mode.
        token_ids: the stream, ``(N,)`` integer tensor or list.
        lengths: window lengths, each >= 2 and <= N.
        max_windows: windows per length (>= 1); as many as ``max(lengths)`` tokens fit, at most.
        score_last: score only the last ``score_last`` predictions of each window (the tokens
            that see the longest context); ``None`` scores all ``L - 1``.
        device: where to run (default: the model's device).

    Returns:
        ``{L: perplexity}`` in the order of ``lengths``.

    Raises:
        ValueError: a length longer than the stream or < 2, bad ``max_windows``/``score_last``.

    Example:
        >>> ppl = perplexity_by_length(model, ids, [256, 512, 1024, 2048], max_windows=4)
        >>> ppl[2048]
        41.7
    """
    stream = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    check_positive_int("max_windows", max_windows)
    lengths = _lengths(lengths)
    for n in lengths:
        if n > stream.numel():
            raise ValueError(f"length {n} is longer than the token stream ({stream.numel()})")
        if score_last is not None and not 1 <= check_positive_int("score_last", score_last) < n:
            raise ValueError(f"score_last must be in [1, {n - 1}] for length {n}, got {score_last}")
    device = _device_of(model, device)
    longest = max(lengths)
    windows = min(max_windows, stream.numel() // longest)
    result: dict[int, float] = {}
    for n in lengths:
        total_nll, total_tokens = 0.0, 0
        for w in range(windows):
            end = (w + 1) * longest  # windows of every length end here
            ids = stream[end - n : end].unsqueeze(0).to(device)  # (1, L)
            logits = model(input_ids=ids).logits[0, :-1].float()  # (L - 1, V)
            targets = ids[0, 1:]
            if score_last is not None:
                logits, targets = logits[-score_last:], targets[-score_last:]
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            total_nll += float(nll)
            total_tokens += targets.numel()
        result[n] = math.exp(total_nll / total_tokens)
    return result


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ``(ids, mask)``, both ``(B, S)`` int64, padded on the right to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask


def document_boundary(tokenizer: Any, boundary: int | str | None = "auto") -> list[int]:
    """The ids put before every text that :func:`bits_per_char` scores.

    ``"auto"``: what the tokenizer itself prepends (Llama's BOS), else its ``<|endoftext|>``
    (the GPT-2 family's document separator: SmolLM2, Qwen2), else its EOS, else its BOS. An int
    is an id, a string a token; ``None`` puts nothing (the first token of each text is then not
    scored and its characters still count, so the value is an upper bound).

    Raises:
        ValueError: ``"auto"`` finds none of those, or the token string is not in the vocabulary.
    """
    if boundary is None:
        return []
    if isinstance(boundary, bool) or not isinstance(boundary, (int, str)):
        raise TypeError(
            f"boundary must be an int id, a token string, 'auto' or None, got {boundary!r}"
        )
    if isinstance(boundary, int):
        return [boundary]
    if boundary != "auto":
        ids = tokenizer.convert_tokens_to_ids([boundary])
        unk = getattr(tokenizer, "unk_token_id", None)
        if ids[0] is None or (ids[0] == unk and boundary != getattr(tokenizer, "unk_token", None)):
            raise ValueError(f"boundary={boundary!r} is not a token of the tokenizer")
        return ids
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    if len(with_special) > len(plain) and with_special[-len(plain) :] == plain:
        return list(with_special[: len(with_special) - len(plain)])
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return [vocab["<|endoftext|>"]]
    for name in ("eos_token_id", "bos_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            return [tid]
    raise ValueError(
        "boundary='auto' found no BOS, <|endoftext|> or EOS token in the tokenizer; pass "
        "boundary=<token id or string> (or None)"
    )


def context_windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """How :func:`bits_per_char` scores a sequence of ``n`` tokens in a context of ``max_length``.

    Returns ``(start, end, first)`` triples: the model reads tokens ``[start, end)`` and its
    predictions of tokens ``first .. end - 1`` are scored. Token 0 (the document boundary) is
    never scored, every other token exactly once; a window after the first moves ``stride``
    tokens on and keeps ``max_length - stride`` tokens of context. ``n <= max_length`` gives the
    single window ``(0, n, 1)``.

    Example:
        >>> context_windows(10, 6, 3)
        [(0, 6, 1), (3, 9, 6), (6, 10, 9)]
    """
    check_positive_int("n", n)
    check_positive_int("max_length", max_length, minimum=2)
    check_positive_int("stride", stride)
    if stride >= max_length:
        raise ValueError(
            f"stride must be < max_length (a window keeps max_length - stride >= 1 tokens of "
            f"context), got stride={stride}, max_length={max_length}"
        )
    out, start, first = [], 0, 1
    while True:
        end = min(start + max_length, n)
        out.append((start, end, first))
        if end == n:
            return out
        start, first = start + stride, end


def _context_length(model: Any, max_length: int | None) -> int | None:
    if max_length is not None:
        return check_positive_int("max_length", max_length, minimum=2)
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 2 else None


@torch.no_grad()
def bits_per_char(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    boundary: int | str | None = "auto",
    max_batch_tokens: int = 2048,
    max_length: int | None = None,
    stride: int | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Bits per character of ``texts`` under ``model``: tokenizer-independent.

    Each text is encoded alone (without special tokens) after the :func:`document_boundary`
    ids; the summed NLL of all its tokens, in bits, is divided by the total number of
    characters (``len(text)``, Unicode code points). Two tokenizers scored on the same texts
    divide by the same count, so an extended vocabulary and its base compare directly. Texts
    are batched by length (``max_batch_tokens`` per forward, padding masked); fp32
    log-softmax. The model is put in eval mode.

    A text longer than the context (``max_length`` tokens, boundary included) is read in
    windows of ``max_length`` tokens, each ``stride`` tokens after the last, and every token
    is scored once, with at least ``max_length - stride`` tokens of context
    (:func:`context_windows`); a shorter text is read whole, so the result does not depend on
    ``max_length`` for texts that fit.

    Args:
        model: a causal LM called as ``model(input_ids=(B, S), attention_mask=(B, S))``.
        tokenizer: a Hugging Face tokenizer (``tokenizer(text).input_ids``).
        texts: non-empty sequence of non-empty strings.
        boundary: see :func:`document_boundary`.
        max_batch_tokens: padded tokens per forward (>= 1; a longer text runs alone).
        max_length: the context in tokens (>= 2). Default: the model's
            ``config.max_position_embeddings``; without one, texts are read whole.
        stride: tokens a window moves on (1 .. ``max_length - 1``; default ``max_length // 2``).
        device: where to run (default: the model's device).

    Returns:
        bits per character (float).

    Raises:
        ValueError: ``texts`` empty, or a text empty; ``max_length`` < 2; ``stride`` out of
            range.
        TypeError: ``texts`` is a single string, or holds something that is not a ``str``.

    Example:
        >>> bits_per_char(model, tokenizer, ["中国的首都是北京。", "Hello world."])
        3.92
    """
    texts = check_texts("texts", texts, empty="refuse")
    check_positive_int("max_batch_tokens", max_batch_tokens)
    context = _context_length(model, max_length)
    if stride is not None and context is None:
        raise ValueError("stride needs a context: pass max_length (the model has no "
                         "config.max_position_embeddings)")  # fmt: skip
    if context is not None:
        stride = context // 2 if stride is None else stride
        context_windows(context, context, stride)  # checks stride against max_length
    device = _device_of(model, device)
    prefix = document_boundary(tokenizer, boundary)
    enc = tokenizer(texts, add_special_tokens=False).input_ids
    pieces = []  # (tokens the model reads, index of the first scored token)
    for ids in enc:
        seq = prefix + list(ids)
        if context is None or len(seq) <= context:
            pieces.append((seq, 1))
            continue
        for start, end, first in context_windows(len(seq), context, stride):
            pieces.append((seq[start:end], first - start))
    pieces.sort(key=lambda piece: len(piece[0]))
    model.eval()
    total, i = 0.0, 0
    while i < len(pieces):
        j = i + 1
        while j < len(pieces) and (j + 1 - i) * len(pieces[j][0]) <= max_batch_tokens:
            j += 1
        batch = pieces[i:j]
        ids, mask = pad_right([seq for seq, _ in batch])
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, S-1): token k+1 at k
        for row, (_, first) in enumerate(batch):
            labels[row, : first - 1] = -100  # a window's context is read, not scored again
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, S-1, V)
        total += torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum"
        ).item()
        i = j
    return total / math.log(2) / sum(len(t) for t in texts)


_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
_FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
_KEY = " The pass key is {key}. Remember it. {key} is the pass key."
_QUESTION = " What is the pass key? The pass key is"


@torch.no_grad()
def passkey_retrieval_accuracy(
    model: Any,
    encode: Callable[[str], list[int]],
    lengths: Sequence[int],
    *,
    trials: int = 10,
    digits: int = 5,
    bos_id: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[int, float]:
    """Passkey retrieval (Mohtashami & Jaggi 2023, arXiv:2305.16300) at each prompt length.

    A random ``digits``-digit key is hidden at a random depth in repeated filler text padded to
    about ``L`` tokens; the trial succeeds when greedy decoding after "The pass key is" would
    produce exactly the key's tokens (checked in one forward pass with the answer appended:
    the argmax at every answer position must be the answer token).

    Args:
        model: a causal LM (``model(input_ids=...).logits``).
        encode: text -> token ids without special tokens, e.g.
            ``lambda s: tokenizer.encode(s, add_special_tokens=False)``.
        lengths: prompt lengths in tokens (each longer than the fixed parts of the prompt).
        trials: keys per length; depths are spread evenly over the filler.
        digits: digits of the key.
        bos_id: prepended when given.
        seed: for the keys (``random.Random(seed)``; no global state).
        device: where to run (default: the model's device).

    Returns:
        ``{L: fraction of trials retrieved}``.

    Raises:
        ValueError: a length too short for the fixed parts, or bad counts.

    Example:
        >>> passkey_retrieval_accuracy(model, lambda s: sp.encode(s), [1024, 4096], trials=20)
        {1024: 1.0, 4096: 0.35}
    """
    check_positive_int("trials", trials)
    check_positive_int("digits", digits)
    lengths = _lengths(lengths)
    device = _device_of(model, device)
    rng = random.Random(seed)
    head = ([bos_id] if bos_id is not None else []) + list(encode(_INTRO))
    filler, question = list(encode(_FILLER)), list(encode(_QUESTION))
    result: dict[int, float] = {}
    for n in lengths:
        hits = 0
        for trial in range(trials):
            key = str(rng.randrange(10 ** (digits - 1), 10**digits))
            key_ids, answer = list(encode(_KEY.format(key=key))), list(encode(" " + key))
            fixed = len(head) + len(key_ids) + len(question) + len(answer)
            repeats = (n - fixed) // len(filler)
            if repeats < 1:
                raise ValueError(
                    f"length {n} is too short for the passkey prompt ({fixed} + filler)"
                )
            before = round(repeats * (trial + 0.5) / trials)  # depth spread over the filler
            ids = head + filler * before + key_ids + filler * (repeats - before) + question
            full = torch.tensor([ids + answer], device=device)  # (1, S)
            logits = model(input_ids=full).logits[0]  # (S, V)
            predicted = logits[len(ids) - 1 : -1].argmax(-1)
            hits += int(torch.equal(predicted.cpu(), torch.tensor(answer)))
        result[n] = hits / trials
    return result
