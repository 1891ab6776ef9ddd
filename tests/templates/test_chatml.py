"""ChatML against the chat templates SmolLM2-Instruct and Qwen2-Instruct ship (committed
fixtures): our render, ids and labels equal ``apply_chat_template``'s, with and without the
default system prompt, and the labels are exactly the replies and their ``<|im_end|>``."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from llamazh.templates import IGNORE_INDEX, get_template

FIXTURES = Path(__file__).parent / "fixtures"
SHIPPED = {
    "chatml-smollm2": FIXTURES / "smollm2_chat_template.jinja",
    "chatml-qwen2": FIXTURES / "qwen2_chat_template.jinja",
}
CHUNKS = [
    "hello", " world", "Hi", "LoRA", "42", ",", ".", "?", "'", "<", ">", "|", "im_end", "#",
    "你好", "世界", "中文", "模型训练", "，", "。", "\u3000", "🙂",
    " ", "  ", "\n", "\n\n", "\t", " \n",
]  # fmt: skip
text = st.lists(st.sampled_from(CHUNKS), max_size=10).map("".join)


@st.composite
def conversations(draw, *, end_with_user: bool):
    system = draw(st.one_of(st.none(), st.just(""), text))
    messages = [] if system is None else [{"role": "system", "content": system}]
    for _ in range(draw(st.integers(1, 3))):
        for _ in range(draw(st.integers(1, 2))):  # ChatML allows two user turns in a row
            messages.append({"role": "user", "content": draw(text)})
        messages.append({"role": "assistant", "content": draw(text)})
    if end_with_user:
        messages.append({"role": "user", "content": draw(text)})
    assume(not any("<|" in m["content"] for m in messages))
    return messages


def shipped_labels(tokenizer, text_: str) -> list[int]:
    """The obvious rule, from the rendered text alone: a token is trained iff it overlaps the
    span from after an ``<|im_start|>assistant\\n`` to the end of the next ``<|im_end|>``."""
    opener, end = "<|im_start|>assistant\n", "<|im_end|>"
    spans, at = [], 0
    while (start := text_.find(opener, at)) >= 0:
        start += len(opener)
        stop = text_.index(end, start) + len(end)
        spans.append((start, stop))
        at = stop
    enc = tokenizer(text_, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for token, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(a < max(e, s + 1) and s < b for a, b in spans)
        out.append(token if inside else IGNORE_INDEX)
    return out


@pytest.mark.parametrize("name", list(SHIPPED))
@given(messages=conversations(end_with_user=False))
def test_encode_equals_the_shipped_template(hf_tokenizers, name, messages):
    tok, template = hf_tokenizers["chatml"], get_template(name)
    shipped = SHIPPED[name].read_text(encoding="utf-8")
    rendered = tok.apply_chat_template(messages, chat_template=shipped, tokenize=False)
    assert template.render(messages, add_generation_prompt=False) == rendered
    ids, labels = template.encode(tok, messages)
    theirs = tok.apply_chat_template(messages, chat_template=shipped, return_dict=True)
    assert ids == theirs["input_ids"]
    assert labels == shipped_labels(tok, rendered)
    # and what the exported template marks with {% generation %}
    ours = tok.apply_chat_template(
        messages,
        chat_template=template.to_jinja(),
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert ours["input_ids"] == ids
    assert ours["assistant_masks"] == [int(label != IGNORE_INDEX) for label in labels]


@pytest.mark.parametrize("name", list(SHIPPED))
@given(messages=conversations(end_with_user=True))
def test_generation_prompt_equals_the_shipped_template(hf_tokenizers, name, messages):
    tok, template = hf_tokenizers["chatml"], get_template(name)
    shipped = SHIPPED[name].read_text(encoding="utf-8")
    theirs = tok.apply_chat_template(
        messages, chat_template=shipped, add_generation_prompt=True, return_dict=False
    )
    rendered = template.render(messages, add_generation_prompt=True)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == theirs


@pytest.mark.parametrize(
    ("name", "system_line"),
    [
        ("chatml-smollm2", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
        ("chatml-qwen2", "You are a helpful assistant."),
        ("chatml", None),
    ],
)
def test_default_system_prompts(name, system_line):
    conv = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    tail = "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！<|im_end|>\n"
    head = "" if system_line is None else f"<|im_start|>system\n{system_line}<|im_end|>\n"
    template = get_template(name)
    assert template.render(conv, add_generation_prompt=False) == head + tail
    own = [{"role": "system", "content": "你是助手。"}, *conv]
    assert template.render(own, add_generation_prompt=False) == (
        "<|im_start|>system\n你是助手。<|im_end|>\n" + tail
    )
    assert template.stop_tokens == ("<|im_end|>",)


def test_labels_are_reply_and_im_end_only(hf_tokenizers):
    tok, template = hf_tokenizers["chatml"], get_template("chatml-smollm2")
    conv = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "你好"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok."},
    ]
    ids, labels = template.encode(tok, conv)
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "你好<|im_end|>ok.<|im_end|>"
    assert template.stop_token_ids(tok) == [2]
