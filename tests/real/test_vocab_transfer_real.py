"""Vocabulary transfer on the real SmolLM2: counted lm_head rows (share_output_rows) lower
held-out Chinese bits per character before any training and leave English alone, and
align_embeddings starts from the same rows. A random tiny model cannot show this: it has no
direction of constant length in its final states (tests/training/test_output_share.py)."""

from __future__ import annotations

import copy

import pytest

from llamazh.evaluation import bits_per_char
from llamazh.tokenizer import chinese_held_out_split, cjk_share, extend_bpe, resize_embeddings
from llamazh.training import align_embeddings, share_output_rows

pytestmark = pytest.mark.slow
SEP = "<|endoftext|>"


@pytest.fixture(scope="module")
def extension(smollm2, tmp_path_factory):
    from transformers import AutoTokenizer

    _, tokenizer = smollm2
    split = chinese_held_out_split()
    train = [t[:200] for t in split.train if cjk_share(t) > 0.3][:1500]
    d = tmp_path_factory.mktemp("vocab") / "tok"
    extend_bpe(tokenizer, train, new_tokens=500).save(d)
    held = [t[:200] for t in split.held_out["zh_d2l"][:5]]
    english = [t[:200] for t in split.held_out["en_d2l"][:4]]
    return AutoTokenizer.from_pretrained(d), train, held, english


def test_counted_rows_lower_chinese_and_keep_english(smollm2, extension):
    base, tokenizer = smollm2
    new, train, held, english = extension
    model = copy.deepcopy(base)
    resize_embeddings(model, tokenizer, new, untie=True)
    before = bits_per_char(model, new, held, boundary=SEP)
    report = share_output_rows(model, tokenizer, new, train)
    after = bits_per_char(model, new, held, boundary=SEP)
    assert report.u_spread < 0.05  # SmolLM2's final states: 0.017 measured
    assert report.seen_new > 400 and report.lowered_old_rows > 0
    assert after < before - 0.1, (before, after)  # measured 7.35 -> 7.15 (1,000 tokens: -0.5)
    base_en = bits_per_char(base, tokenizer, english, boundary=SEP)
    assert bits_per_char(model, new, english, boundary=SEP) == pytest.approx(base_en, rel=0.01)

    aligned = copy.deepcopy(base)
    resize_embeddings(aligned, tokenizer, new, untie=True)
    align_embeddings(aligned, base, tokenizer, new, train, max_steps=1, boundary=SEP)
    diff = (aligned.lm_head.weight - model.lm_head.weight).detach().abs().max()
    assert float(diff) < 1e-4  # the same counted rows; only input rows trained
