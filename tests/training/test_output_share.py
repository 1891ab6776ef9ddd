"""share_output_rows on a tiny untied Llama with SmolLM2's byte-level BPE and a small extend_bpe
extension: the rows it writes against a plain recount, what it leaves alone, bad input, and
align_embeddings starting from it."""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from llamazh.testing import tiny_llama
from llamazh.tokenizer import chinese_held_out_split, cjk_share, extend_bpe, resize_embeddings
from llamazh.tokenizer._sources import as_view, piece_splitter
from llamazh.training import align_embeddings, share_output_rows
from llamazh.training.output_share import SPREAD_WARNING

# tiny random models have no direction of constant length: share_output_rows says so
pytestmark = pytest.mark.filterwarnings("ignore:the model's final hidden states:UserWarning")

TOKENIZER = Path(__file__).resolve().parent.parent / "fixtures" / "smollm2_tokenizer"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    lines = [t[:120] for t in chinese_held_out_split().train[:300]]
    old = AutoTokenizer.from_pretrained(TOKENIZER)
    d = tmp_path_factory.mktemp("share") / "tok"
    extend_bpe(TOKENIZER, lines, new_tokens=150).save(d)
    new = AutoTokenizer.from_pretrained(d)
    base = tiny_llama(vocab_size=len(old), num_hidden_layers=2, tie_word_embeddings=False)
    model = copy.deepcopy(base)
    resize_embeddings(model, old, new)
    return old, new, base, model, lines[:60]


def _recount(old, new, texts):
    """Plain reference: starts of extended tokens matched to base pieces by decoded byte length."""
    occurs, starts = Counter(), Counter()
    for text in texts:
        o = old(text, add_special_tokens=False).input_ids
        n = new(text, add_special_tokens=False).input_ids
        at, b = {}, 0
        for t in o:
            at[b] = t
            b += len(old.convert_ids_to_tokens(t))
        b = 0
        for t in n:
            if b in at:
                occurs[t] += 1
                starts[at[b]] += 1
            b += len(new.convert_ids_to_tokens(t))
    return occurs, starts


def test_rows_are_first_piece_plus_log_share(setup):
    old, new, _base, resized, texts = setup
    model = copy.deepcopy(resized)
    embed = model.get_input_embeddings().weight.clone()
    head = model.lm_head.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:  # a random model has no bias direction
        warnings.simplefilter("always")
        report = share_output_rows(model, old, new, texts, smoothing=0.5)
    assert (report.u_spread > SPREAD_WARNING) == any("roughly" in str(w.message) for w in caught)
    after = model.lm_head.weight.detach()
    n_old, s = len(old), 0.5
    split = piece_splitter(as_view(old, "old"))
    first = {t: split(new.convert_ids_to_tokens(t))[0] for t in range(n_old, len(new))}
    children = Counter(first.values())
    occurs, starts = _recount(old, new, texts)
    delta = after[n_old:] - head[list(first.values())]  # (K, D): log share times one vector u
    share = torch.tensor([
        math.log((occurs[t] + s) / (starts[a] + s * (children[a] + 1))) for t, a in first.items()
    ])  # fmt: skip
    u = delta[share.abs().argmax()] / share[share.abs().argmax()]
    torch.testing.assert_close(delta, share[:, None] * u[None], atol=1e-4, rtol=1e-4)
    for a in children:  # the old piece keeps its own share; the shares of a piece sum to 1
        own = (occurs[a] + s) / (starts[a] + s * (children[a] + 1))
        torch.testing.assert_close(after[a], head[a] + math.log(own) * u, atol=1e-4, rtol=1e-4)
        total = own + sum(math.exp(share[t - n_old]) for t, b in first.items() if b == a)
        assert total == pytest.approx(1.0, abs=1e-6)
    untouched = [i for i in range(n_old) if i not in children]
    assert torch.equal(after[untouched], head[untouched])
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert report.lowered_old_rows == len(children) and report.new_rows == len(first)
    assert report.seen_new == sum(1 for t in occurs if t >= n_old)
    assert report.counted_tokens == sum(occurs.values())


def test_fitted_direction_is_a_bias_on_a_model_that_has_one(setup):
    # a model whose final norm keeps one dimension large and constant: h @ u == 1 exactly
    old, new, base, _resized, texts = setup
    model = copy.deepcopy(base)
    resize_embeddings(model, old, new)
    with torch.no_grad():
        model.model.norm.weight.fill_(1e-3)
        model.model.norm.weight[0] = 1.0
        model.model.layers[-1].mlp.down_proj.weight.zero_()
        model.model.layers[-1].mlp.down_proj.bias = None
        model.model.layers[-1].self_attn.o_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 50.0
    report = share_output_rows(model, old, new, texts)
    assert report.u_spread < 1e-3


def test_bad_input(setup):
    old, new, base, resized, texts = setup
    with pytest.raises(ValueError, match="untie=True"):
        tied = tiny_llama(vocab_size=len(old), num_hidden_layers=1, tie_word_embeddings=True)
        resize_embeddings(tied, old, new)
        share_output_rows(tied, old, new, texts)
    with pytest.raises(ValueError, match="resize it first"):
        share_output_rows(copy.deepcopy(base), old, new, texts)
    with pytest.raises(ValueError, match="none of the"):
        share_output_rows(copy.deepcopy(resized), old, new, ["hello world"])
    with pytest.raises(TypeError, match="single str"):
        share_output_rows(copy.deepcopy(resized), old, new, "中文")
    with pytest.raises(ValueError, match="smoothing"):
        share_output_rows(copy.deepcopy(resized), old, new, texts, smoothing=0)
    with pytest.raises(ValueError, match="extend old_tokenizer"):
        share_output_rows(copy.deepcopy(resized), new, old, texts)


def test_align_starts_from_the_share_and_keeps_it(setup):
    old, new, base, resized, texts = setup
    shared = copy.deepcopy(resized)
    share_output_rows(shared, old, new, texts)
    aligned = copy.deepcopy(resized)
    report = align_embeddings(aligned, base, old, new, texts, max_steps=2, input_layer=1,
                              chunk_tokens=8192)  # fmt: skip
    assert report.steps == 2
    torch.testing.assert_close(aligned.lm_head.weight, shared.lm_head.weight)
    again = copy.deepcopy(shared)  # shared first, then aligned: the same rows, not lowered twice
    align_embeddings(again, base, old, new, texts, max_steps=1, input_layer=1, chunk_tokens=8192)
    torch.testing.assert_close(again.lm_head.weight, shared.lm_head.weight)
    n_old = len(old)
    emb = aligned.get_input_embeddings().weight
    assert torch.equal(emb[:n_old], resized.get_input_embeddings().weight[:n_old])
    assert not torch.equal(emb[n_old:], resized.get_input_embeddings().weight[n_old:])


def test_sentencepiece_extension(tmp_path, llama2_model_path):
    # Chinese-LLaMA-2's tokenizer extends Llama-2's: SentencePiece pieces, "▁" for spaces
    from transformers import AutoTokenizer

    from llamazh.tokenizer import export_hf_tokenizer

    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "chinese_llama"
    old = AutoTokenizer.from_pretrained(export_hf_tokenizer(llama2_model_path, tmp_path / "old"))
    new = AutoTokenizer.from_pretrained(
        export_hf_tokenizer(fixture / "chinese_llama2_tokenizer.model", tmp_path / "new")
    )
    model = tiny_llama(vocab_size=len(old), num_hidden_layers=1, tie_word_embeddings=False)
    resize_embeddings(model, old, new)
    head = model.lm_head.weight.detach().clone()
    texts = [t[:100] for t in chinese_held_out_split().train if cjk_share(t) > 0.5][:80]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model: no bias direction
        report = share_output_rows(model, old, new, texts)
    assert report.seen_new > 100 and report.counted_tokens > 1000
    changed = (model.lm_head.weight != head).any(-1)
    assert changed[len(old) :].all()
    assert int(changed[: len(old)].sum()) == report.lowered_old_rows
