"""SFT encoding: labels, max_length policies, record builders."""

from __future__ import annotations

import pytest

from llamazh.templates import (
    IGNORE_INDEX,
    TooLongError,
    alpaca_messages,
    build_sft_examples,
    get_template,
    sharegpt_messages,
)


def conv(*contents):
    return [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 9, contents)]


def test_labels_are_the_replies(hf_tokenizers):
    tok, t = hf_tokenizers["llama2-always"], get_template("alpaca2")
    enc = t.encode(tok, conv("你好", "你好！", "再见", "再见。"))
    kept = [i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert tok.decode(kept) == "你好！</s> 再见。</s>"  # the second answer's space is "▁再"
    assert enc.input_ids.count(tok.bos_token_id) == 2  # one per exchange, never doubled


def test_max_length_policies(hf_tokenizers):
    tok, t = hf_tokenizers["llama3"], get_template("llama3")
    messages = conv("q one", "answer one", "q two", "a much longer answer number two " * 4)
    full = t.encode(tok, messages)
    first = t.encode(tok, messages[:2])
    n = len(full.input_ids)
    assert t.encode(tok, messages, max_length=n).input_ids == full.input_ids
    with pytest.raises(TooLongError, match=f"{n} tokens > max_length={n - 1}"):
        t.encode(tok, messages, max_length=n - 1)
    dropped = t.encode(tok, messages, max_length=n - 1, overflow="drop_turns")
    assert dropped == first and dropped == (first.input_ids, first.labels)
    assert isinstance(first, tuple) and len(first) == 2
    assert dropped.dropped_messages == 2
    trailing_user = [*messages, {"role": "user", "content": "and a question left unanswered"}]
    fit = t.encode(tok, trailing_user, max_length=n, overflow="drop_turns")
    assert fit.input_ids == full.input_ids and fit.dropped_messages == 1
    cut = t.encode(tok, messages, max_length=n - 3, overflow="truncate")
    assert cut.input_ids == full.input_ids[: n - 3] and cut.truncated_tokens == 3
    start = next(i for i, v in enumerate(first.labels) if v != IGNORE_INDEX)
    for policy in ("error", "drop_turns", "truncate"):
        with pytest.raises(TooLongError):
            t.encode(tok, messages, max_length=start, overflow=policy)
    ok = t.encode(tok, messages, max_length=start + 1, overflow="truncate")
    assert sum(v != IGNORE_INDEX for v in ok.labels) == 1  # cut short, never to nothing
    with pytest.raises(ValueError, match="overflow must be one of"):
        t.encode(tok, messages, max_length=10, overflow="cut")
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        t.encode(tok, messages, max_length=0)


def test_encode_errors(hf_tokenizers):
    with pytest.raises(ValueError, match="no assistant reply"):
        get_template("alpaca2").encode(hf_tokenizers["llama2-first"], conv("q"))
    with pytest.raises(ValueError, match=r"needs '<\|begin_of_text\|>'"):
        get_template("llama3").encode(hf_tokenizers["llama2-first"], conv("q", "a"))
    with pytest.raises(TypeError, match="fast"):
        get_template("alpaca2").encode(object(), conv("q", "a"))


def test_stop_token_ids(hf_tokenizers):
    assert get_template("alpaca2").stop_token_ids(hf_tokenizers["zh-merged"]) == [2]
    tok = hf_tokenizers["llama3"]
    ids = get_template("llama3").stop_token_ids(tok)
    assert ids == tok.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])


def test_alpaca_messages():
    rec = {"instruction": "翻译成英文", "input": "你好", "output": "Hello"}
    assert alpaca_messages(rec) == conv("翻译成英文\n你好", "Hello")
    assert alpaca_messages({**rec, "input": ""})[0]["content"] == "翻译成英文"
    assert alpaca_messages({**rec, "input": None}, system="S")[0] == {
        "role": "system",
        "content": "S",
    }
    with pytest.raises(TypeError, match=r"record\['output'\] must be a str"):
        alpaca_messages({"instruction": "x"})


def test_sharegpt_messages():
    rec = {
        "system": "S",
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
        ],
    }
    assert sharegpt_messages(rec) == [{"role": "system", "content": "S"}, *conv("hi", "hello")]
    with pytest.raises(ValueError, match=r"conversations\[0\]\['from'\] must be one of"):
        sharegpt_messages({"conversations": [{"from": "robot", "value": "x"}]})


def test_build_sft_examples(hf_tokenizers):
    tok = hf_tokenizers["zh-merged"]
    records = [
        {"instruction": "你好", "input": "", "output": "你好！"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"messages": conv("q1", "a1", "q2", "a2 " * 40)},
        {"instruction": "长" * 300, "output": "短"},
    ]
    out = build_sft_examples("alpaca2", tok, records, max_length=80)
    assert out.skipped == (3,) and out.shortened == (2,)
    assert len(out.examples) == 3
    assert out.examples[0] == dict(
        zip(["input_ids", "labels"], get_template("alpaca2").encode(tok, conv("你好", "你好！")))
    )
    with pytest.raises(ValueError, match=r"records\[1\]: .*two assistant turns"):
        build_sft_examples(
            "alpaca2", tok, [records[0], {"messages": conv("q", "a") + conv("", "b")[1:]}]
        )


def test_stripping_special_token_is_refused(tokenizer_dirs):
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama2-always"]))
    tok.add_special_tokens({"eos_token": AddedToken("</s>", rstrip=True, special=True)})
    if not tok.added_tokens_decoder[2].rstrip:
        pytest.skip("this transformers does not let rstrip be changed on an existing token")
    with pytest.raises(ValueError, match="lstrip/rstrip"):
        get_template("alpaca2").encode(tok, conv("q", "a"))


def test_first_only_dummy_prefix_warns(tokenizer_dirs, hf_tokenizers):
    import warnings

    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama2-first"]))
    with pytest.warns(UserWarning, match="legacy=True"):
        get_template("alpaca2").encode(fresh, conv("q", "a"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_template("alpaca2").encode(hf_tokenizers["llama2-exact"], conv("q", "a"))
        get_template("alpaca2").encode(hf_tokenizers["llama2-always"], conv("q", "a"))
