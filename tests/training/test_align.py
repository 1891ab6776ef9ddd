"""align_embeddings on a tiny Llama with SmolLM2's byte-level BPE and a small extend_bpe
extension: only the new rows change, budgets and bad input, interruption, and that the
objectives it optimises go down."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamazh.evaluation import bits_per_char
from llamazh.testing import tiny_llama
from llamazh.tokenizer import chinese_held_out_split, extend_bpe, resize_embeddings
from llamazh.tokenizer._sources import as_view, piece_splitter
from llamazh.training import align as align_mod
from llamazh.training import align_embeddings

# tiny random models have no direction of constant length: share_output_rows says so
pytestmark = pytest.mark.filterwarnings("ignore:the model's final hidden states:UserWarning")

TOKENIZER = Path(__file__).resolve().parent.parent / "fixtures" / "smollm2_tokenizer"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    split = chinese_held_out_split()
    lines = [t[:120] for t in split.train[:400]]
    old = AutoTokenizer.from_pretrained(TOKENIZER)
    ext = extend_bpe(TOKENIZER, lines, new_tokens=200)
    d = tmp_path_factory.mktemp("align") / "tok"
    ext.save(d)
    new = AutoTokenizer.from_pretrained(d)
    base = tiny_llama(vocab_size=len(old), num_hidden_layers=3, tie_word_embeddings=False)
    return old, new, base, lines[:40], [t[:80] for t in split.held_out["zh_d2l"][:6]]


def _resized(base, old, new, **kw):
    model = copy.deepcopy(base)
    resize_embeddings(model, old, new, **kw)
    return model


def test_only_new_rows_change_and_state_is_restored(setup):
    old, new, base, texts, held = setup
    model = _resized(base, old, new)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    report = align_embeddings(model, base, old, new, texts, max_steps=3, input_layer=2,
                              chunk_tokens=256, eval_texts=held)  # fmt: skip
    n_old = len(old)
    after = model.state_dict()
    # the lm_head's old rows change only where share_output_rows lowers them: pieces that
    # begin a new token (tests/training/test_output_share.py)
    split = piece_splitter(as_view(old, "old"))
    firsts = {split(new.convert_ids_to_tokens(t))[0] for t in range(n_old, len(new))}
    others = [i for i in range(n_old) if i not in firsts]
    for key, value in before.items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            kept = slice(0, n_old) if key.endswith("embed_tokens.weight") else others
            assert torch.equal(after[key][kept], value[kept]), key
            assert not torch.equal(after[key][n_old:], value[n_old:]), key
        else:
            assert torch.equal(after[key], value), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training
    assert report.steps == 3 and report.new_rows == len(new) - n_old
    assert len(report.curve) >= 2 and report.curve[0][0] < report.curve[-1][0] <= report.cpu_s + 0.1
    assert report.seen_rows > 0
    assert report.curve[-1][1] == pytest.approx(bits_per_char(model, new, held))
    assert "bits/char" in str(report)


def test_objectives_go_down_on_repeated_text(setup):
    old, new, base, texts, _ = setup
    model = _resized(base, old, new, untie=False)
    report = align_embeddings(model, base, old, new, texts[:8], max_steps=12, input_layer=2,
                              chunk_tokens=4096, lr=1e-3, output_share=False)  # fmt: skip
    first, last = report.losses[0], report.losses[-1]
    assert last[2] < first[2]  # input: hidden-state mismatch
    assert last[1] < first[1]  # output: bits per extended token


def test_tied_model_trains_the_shared_rows(setup):
    old, new, _base, texts, _ = setup
    tied_base = tiny_llama(vocab_size=len(old), num_hidden_layers=2, tie_word_embeddings=True)
    model = _resized(tied_base, old, new)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    align_embeddings(model, tied_base, old, new, texts, max_steps=2, input_layer=1)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    n_old = len(old)
    assert torch.equal(model.lm_head.weight[:n_old], tied_base.lm_head.weight)


def test_interrupted_alignment_leaves_a_completed_step(setup, monkeypatch):
    old, new, base, texts, _ = setup
    done = _resized(base, old, new)
    align_embeddings(done, base, old, new, texts, max_steps=1, input_layer=2, chunk_tokens=256)
    model = _resized(base, old, new)
    calls = []

    def flaky(real):
        def call(*args, **kwargs):  # the second step is interrupted, whatever the objective
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        return call

    for name in ("_lm_losses", "_input_loss"):
        monkeypatch.setattr(align_mod, name, flaky(getattr(align_mod, name)))
    with pytest.raises(KeyboardInterrupt):
        align_embeddings(model, base, old, new, texts, max_steps=5, input_layer=2,
                         chunk_tokens=256)  # fmt: skip
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(model.state_dict()[name], done.state_dict()[name]), name
    assert all(p.requires_grad for p in model.parameters())


def test_bad_input(setup):
    old, new, base, texts, _ = setup
    model = _resized(base, old, new)
    with pytest.raises(ValueError, match="max_steps"):
        align_embeddings(model, base, old, new, texts, max_steps=0)
    with pytest.raises(ValueError, match="max_cpu_s"):
        align_embeddings(model, base, old, new, texts, max_cpu_s=-1)
    with pytest.raises(ValueError, match="max_cpu_s=1e-06 is too small"):
        align_embeddings(model, base, old, new, texts, max_cpu_s=1e-6)
    with pytest.raises(ValueError, match="none of the"):
        align_embeddings(model, base, old, new, ["hello world", "plain English"], max_steps=1)
    with pytest.raises(TypeError, match="single str"):
        align_embeddings(model, base, old, new, "中文", max_steps=1)
    with pytest.raises(ValueError, match="extend old_tokenizer"):
        align_embeddings(model, base, new, old, texts, max_steps=1)
    with pytest.raises(ValueError, match="resize it first"):
        align_embeddings(copy.deepcopy(base), base, old, new, texts, max_steps=1)
    with pytest.raises(ValueError, match="input_layer"):
        align_embeddings(model, base, old, new, texts, max_steps=1, input_layer=9)
    with pytest.raises(ValueError, match="same object"):
        align_embeddings(model, model, old, new, texts, max_steps=1)


BAD_TEXTS = [
    ("中文", TypeError, "single str"),
    ([], ValueError, "must not be empty"),
    (["中文", 3], TypeError, r"texts\[1\] must be a str, got int"),
    (["中文", None], TypeError, r"texts\[1\] must be a str, got NoneType"),
    (["", ""], ValueError, "only empty strings"),
    (42, TypeError, "sequence of strings, got int"),
]


@pytest.mark.parametrize(("texts", "error", "match"), BAD_TEXTS)
def test_texts_are_checked_alike(setup, texts, error, match):
    # one rule (llamazh._checks.check_texts) for the three functions that read lists of texts;
    # bits_per_char also refuses a single empty text (its characters are the denominator)
    from llamazh.training import share_output_rows

    old, new, base, _, _ = setup
    model = _resized(base, old, new, untie=True)
    with pytest.raises(error, match=match):
        align_embeddings(model, base, old, new, texts, max_steps=1)
    with pytest.raises(error, match=match):
        share_output_rows(copy.deepcopy(model), old, new, texts)
    match = r"texts\[0\] must be a non-empty string" if texts == ["", ""] else match
    with pytest.raises(error, match=match):
        bits_per_char(base, old, texts)


def test_empty_texts_among_others():
    from llamazh._checks import check_texts

    assert check_texts("texts", ("a", "", "b")) == ["a", "b"]
    assert check_texts("texts", (t for t in ["a"])) == ["a"]
    with pytest.raises(ValueError, match=r"texts\[1\] must be a non-empty string"):
        check_texts("texts", ["a", ""], empty="refuse")
    with pytest.raises(ValueError, match="empty must be one of"):
        check_texts("texts", ["a"], empty="keep")


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="ab 。\n中文", min_size=0, max_size=200),
    max_length=st.integers(1, 40),
)
def test_long_texts_are_split_into_pieces_that_fit_in_order(text, max_length):
    from llamazh.training._align_teacher import _split_long

    count = len  # one token per character: the tightest case
    pieces = _split_long(["短", text, "end"], count, max_length)
    assert "".join(pieces) == "短" + text + "end"
    assert all(piece for piece in pieces) or text == ""
    assert all(count(piece) <= max(max_length, 1) for piece in pieces)


def test_a_long_text_is_read_to_its_end(setup):
    old, new, base, texts, _ = setup
    filler = " ".join(["plain English words"] * 80)
    tail = next(t for t in texts if any(i >= len(old) for i in new(t).input_ids))
    long = [filler + "\n" + tail]  # the only new tokens sit past the first max_length tokens
    assert len(old(filler).input_ids) > 64
    model = _resized(base, old, new)
    report = align_embeddings(model, base, old, new, long, max_steps=4, input_layer=1,
                              max_length=64, chunk_tokens=256)  # fmt: skip
    assert report.seen_rows > 0
    assert report.teacher_tokens >= len(old(long[0]).input_ids)
