"""Golden strings per template (hand-written from the reference code) and the bad-input errors."""

from __future__ import annotations

import dataclasses

import pytest

from llamazh.templates import TEMPLATES, ChatTemplate, get_template

Q1, A1, Q2, A2 = "你好", "你好！有什么可以帮你？", "Translate: cat", "猫"
ALPACA_SYS = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ZH_SYS = "You are a helpful assistant. 你是一个乐于助人的助手。"
ZH_LONG = ZH_SYS + "请你提供专业、有逻辑、内容真实、有价值的详细回复。"


def conv(*contents, system=None):
    roles = ["user", "assistant"] * len(contents)
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return msgs + [{"role": r, "content": c} for r, c in zip(roles, contents)]


GOLDEN = [
    # (template, messages, add_generation_prompt, text)
    ("alpaca", conv(Q1), True, f"<s>{ALPACA_SYS}\n\n### Instruction:\n{Q1}\n\n### Response: "),
    (
        "alpaca",
        conv(Q1, A1, Q2, A2),
        False,
        f"<s>{ALPACA_SYS}\n\n### Instruction:\n{Q1}\n\n### Response: {A1}</s>"
        f"### Instruction:\n{Q2}\n\n### Response: {A2}</s>",
    ),
    (
        "alpaca-inference",
        conv(Q1),
        True,
        f"<s>{ALPACA_SYS}\n\n### Instruction:\n\n{Q1}\n\n### Response:\n\n",
    ),
    ("alpaca2", conv(Q1), True, f"<s>[INST] <<SYS>>\n{ZH_SYS}\n<</SYS>>\n\n{Q1} [/INST]"),
    (
        "alpaca2",
        conv(Q1, A1, Q2),
        True,
        f"<s>[INST] <<SYS>>\n{ZH_SYS}\n<</SYS>>\n\n{Q1} [/INST] {A1}</s><s>[INST] {Q2} [/INST]",
    ),
    (
        "alpaca2",
        conv(Q1, A1, system=""),
        False,
        f"<s>[INST] <<SYS>>\n\n<</SYS>>\n\n{Q1} [/INST] {A1}</s>",
    ),
    # an empty answer gets no leading space (the seed's sp("") is empty)
    ("alpaca2", conv(Q1, ""), False, f"<s>[INST] <<SYS>>\n{ZH_SYS}\n<</SYS>>\n\n{Q1} [/INST]</s>"),
    ("llama2-chat", conv(Q1, ""), False, f"<s>[INST] {Q1} [/INST]  </s>"),
    ("alpaca2-long", conv(Q1), True, f"<s>[INST] <<SYS>>\n{ZH_LONG}\n<</SYS>>\n\n{Q1} [/INST]"),
    (
        "llama2-chat",
        conv(Q1, A1, Q2),
        True,
        f"<s>[INST] {Q1} [/INST] {A1} </s><s>[INST] {Q2} [/INST]",
    ),
    (
        "llama2-chat",
        conv(" x ", " y\n", " z ", system="Be brief."),
        True,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n x [/INST] y </s><s>[INST] z [/INST]",
    ),
    (
        "llama3",
        conv(Q1),
        True,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{ZH_SYS}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    (
        "llama3",
        conv(" hi ", " ok ", system="S"),
        False,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>",
    ),
]


@pytest.mark.parametrize(("name", "messages", "gen", "expected"), GOLDEN)
def test_golden(name, messages, gen, expected):
    assert get_template(name).render(messages, add_generation_prompt=gen) == expected


def test_registry():
    assert set(TEMPLATES) >= {"alpaca", "alpaca2", "alpaca2-long", "llama2-chat", "llama3"}
    t = get_template("llama3")
    assert get_template(t) is t and isinstance(t, ChatTemplate)
    with pytest.raises(ValueError, match=r"unknown template name='vicuna'.*'alpaca2'"):
        get_template("vicuna")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.default_system = "x"  # type: ignore[misc]
    custom = dataclasses.replace(t, name="llama3-zh", default_system="你是助手。")
    assert "你是助手。" in custom.render(conv(Q1))
    none = dataclasses.replace(t, default_system=None).render(conv(Q1))
    assert "system" not in none


BAD = [
    ([], "must not be empty"),
    ([{"role": "system", "content": "s"}], "only a system message"),
    ([{"role": "bot", "content": "x"}], "must be one of 'system', 'user', 'assistant'; got 'bot'"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], r"messages\[1\]"),
    ([{"role": "assistant", "content": "a"}], "must be a user message"),
    ([*conv("q", "a"), {"role": "assistant", "content": "b"}], "two assistant turns in a row"),
]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize(("messages", "match"), BAD)
def test_bad_conversations(name, messages, match):
    with pytest.raises(ValueError, match=match):
        get_template(name).render(messages)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_bad_conversations_in_jinja(hf_tokenizers, name):
    """The exported template refuses the same conversations (transformers raises)."""
    tok = hf_tokenizers["llama3" if name == "llama3" else "llama2-first"]  # render only
    jinja = get_template(name).to_jinja()
    for messages, _ in BAD[1:]:
        with pytest.raises(Exception):  # noqa: B017 (jinja's TemplateError or ValueError)
            tok.apply_chat_template(messages, chat_template=jinja, tokenize=False)


def test_alternation_rules():
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="two user turns in a row"):
        get_template("alpaca2").render(two_users)
    text = get_template("llama3").render(two_users)  # representable in Llama-3's format
    assert text.count("<|start_header_id|>user") == 2
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        get_template("alpaca2").render(conv("q", "a"))
    with pytest.raises(TypeError, match=r"messages\[0\]\['content'\] must be a str"):
        get_template("alpaca2").render([{"role": "user", "content": None}])
    with pytest.raises(TypeError, match="messages must be a list"):
        get_template("alpaca2").render("hello")  # type: ignore[arg-type]


def test_content_with_braces_is_literal():
    text = get_template("alpaca2").render(conv("{content} {system}"))
    assert text.endswith("{content} {system} [/INST]")
