"""Tokenizer round trips: AutoTokenizer -> save -> AutoTokenizer keeps BOS/EOS/PAD, added tokens
and the chat template for every export backend; added tokens of a directory count as rows; every
library function accepts what AutoTokenizer returns for the library's exports."""

from __future__ import annotations

import pytest

from llamazh.tokenizer import (
    encoding_efficiency,
    export_hf_tokenizer,
    merge_sentencepiece,
    resize_embeddings,
    save_tokenizer,
)

FIXTURES = __import__("pathlib").Path(__file__).resolve().parent.parent / "fixtures"
TEXTS = ["你好，世界！今天天气很好。", "Hello world, two  spaces.", "emoji 🙂 and 中文 mixed"]
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _auto(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _summary(tok):
    return (
        [tok(t).input_ids for t in TEXTS],
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
        len(tok),
        tok.chat_template,
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory, merged_rank, merged_seed, bpe_extensions):
    root = tmp_path_factory.mktemp("exports")
    with pytest.warns(UserWarning, match="share a score"):
        seed_fast = export_hf_tokenizer(
            merged_seed,
            root / "seed-fast",
            backend="fast",
            chat_template=TEMPLATE,
            pad_token="<unk>",
        )
    return {
        "rank-fast": export_hf_tokenizer(
            merged_rank, root / "rank-fast", chat_template=TEMPLATE, pad_token="<unk>"
        ),
        "rank-sentencepiece": export_hf_tokenizer(
            merged_rank,
            root / "rank-sp",
            backend="sentencepiece",
            chat_template=TEMPLATE,
            pad_token="<unk>",
        ),
        "seed-auto": export_hf_tokenizer(
            merged_seed, root / "seed-auto", chat_template=TEMPLATE, pad_token="<unk>"
        ),
        "seed-fast": seed_fast,
        "extend_bpe": bpe_extensions["smollm2"].save(root / "bpe"),
    }


@pytest.mark.parametrize(
    "name", ["rank-fast", "rank-sentencepiece", "seed-auto", "seed-fast", "extend_bpe"]
)
def test_save_round_trip_keeps_specials_added_tokens_and_template(exports, tmp_path, name):
    tok = _auto(exports[name])
    if name != "extend_bpe":
        assert tok("你好").input_ids[0] == tok.bos_token_id == 1
    tok.add_tokens(["<extra_tok>"])
    before = _summary(tok)
    save_tokenizer(tok, tmp_path / "saved")
    assert _summary(_auto(tmp_path / "saved")) == before
    if tok.is_fast:  # fast backends survive a plain save_pretrained (what Trainer does) too
        tok.save_pretrained(str(tmp_path / "plain"))
        assert _summary(_auto(tmp_path / "plain")) == before


def test_added_pad_counts_as_a_row_49954(tmp_path, llama2_model_path):
    from llamazh.testing import tiny_llama

    merged = merge_sentencepiece(llama2_model_path, FIXTURES / "chinese_llama/chinese_sp.model")
    assert len(merged.proto.pieces) == 49953
    tok = _auto(export_hf_tokenizer(merged, tmp_path / "zh"))
    tok.add_special_tokens({"pad_token": "[PAD]"})  # Chinese-Alpaca's 49,954
    save_tokenizer(tok, tmp_path / "alpaca")
    loaded = _auto(tmp_path / "alpaca")
    assert len(loaded) == 49954 and loaded.pad_token_id == 49953
    for new in (tmp_path / "alpaca", loaded):  # the directory and the object it loads as
        model = tiny_llama(vocab_size=32000, hidden_size=16, intermediate_size=32)
        assert model.get_input_embeddings().weight.shape[0] == 32000
        resize_embeddings(model, llama2_model_path, new, init="mean")
        assert model.get_input_embeddings().weight.shape[0] == 49954
        batch = loaded(["你好", "你好，世界"], padding=True, return_tensors="pt")
        model(**batch)  # the padded batch's [PAD] id has a row
    report = encoding_efficiency({"alpaca": loaded}, {"zh": [TEXTS[0]]})
    assert report.as_dict()


def test_sentencepiece_backend_is_accepted_by_encode(exports):
    from llamazh.templates import get_template

    fast, slow = _auto(exports["rank-fast"]), _auto(exports["rank-sentencepiece"])
    assert not slow.is_fast
    messages = [
        {"role": "user", "content": "你好，介绍一下 Python。"},
        {"role": "assistant", "content": "Python 是一种编程语言 🙂"},
    ]
    template = get_template("alpaca2")
    assert template.encode(slow, messages) == template.encode(fast, messages)
    report = encoding_efficiency({"fast": fast, "sp": slow}, {"zh": TEXTS})
    rows = report.as_dict()
    assert len(rows) > 0
