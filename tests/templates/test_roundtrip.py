"""Our render/encode against transformers' apply_chat_template on the exported Jinja, with real
tokenizers and hypothesis-drawn conversations (Chinese, English, whitespace at the edges, empty
system prompts, several turns)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from llamazh.templates import IGNORE_INDEX, TEMPLATES

LLAMA2_FAMILY = ["alpaca", "alpaca-inference", "alpaca2", "alpaca2-long", "llama2-chat"]
KINDS = ("llama2-first", "llama2-always", "llama2-exact", "zh-merged")
CASES = [(t, k) for t in LLAMA2_FAMILY for k in KINDS]
CASES += [("llama3", "llama3")]
CHATML = ["chatml", "chatml-smollm2", "chatml-qwen2"]
CASES += [(t, "chatml") for t in CHATML]
SPECIALS = ("<s>", "</s>", "<unk>", "<|")
TOKENIZER_OF = {"llama3": "llama3", **dict.fromkeys(CHATML, "chatml")}

CHUNKS = [
    "hello", " world", "Hi", "the model", "LoRA", "42", "3.14", ",", ".", "!", "?", "'", '"',
    "(", ")", "[", "]", "#", ":", "-", "/", "<", ">", "[INST]", "<<SYS>>", "###", "é", "🙂",
    "你好", "世界", "中文", "模型训练", "，", "。", "！", "？", "：", "“", "”", "（", "）",
    "\u3000",
    " ", "  ", "   ", "\n", "\n\n", "\t", " \n",
]  # fmt: skip
text = st.lists(st.sampled_from(CHUNKS), max_size=12).map("".join)


@st.composite
def conversations(draw, *, end_with_user: bool | None = None):
    system = draw(st.one_of(st.none(), st.just(""), text))
    turns = draw(st.integers(1, 3))
    messages = [] if system is None else [{"role": "system", "content": system}]
    for _ in range(turns):
        messages.append({"role": "user", "content": draw(text)})
        messages.append({"role": "assistant", "content": draw(text)})
    last_user = draw(st.booleans()) if end_with_user is None else end_with_user
    if last_user:
        messages.append({"role": "user", "content": draw(text)})
    assume(not any(s in m["content"] for m in messages for s in SPECIALS))
    return messages


def _hf(tokenizer, template, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=template.to_jinja(), **kwargs)


@pytest.mark.parametrize("name", list(TEMPLATES))
@given(messages=conversations())
def test_render_equals_jinja(hf_tokenizers, name, messages):
    template = TEMPLATES[name]
    tok = hf_tokenizers[TOKENIZER_OF.get(name, "llama2-first")]
    gen = messages[-1]["role"] == "user"
    ours = template.render(messages, add_generation_prompt=gen)
    assert ours == _hf(tok, template, messages, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize(("name", "kind"), CASES)
@given(messages=conversations(end_with_user=False))
def test_encode_equals_apply_chat_template(hf_tokenizers, name, kind, messages):
    template, tok = TEMPLATES[name], hf_tokenizers[kind]
    ids, labels = template.encode(tok, messages)
    out = _hf(tok, template, messages, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == out["input_ids"], (tok.convert_ids_to_tokens(ids), out.tokens())
    mask = [int(label != IGNORE_INDEX) for label in labels]
    assert mask == out["assistant_masks"]
    assert all(label in (IGNORE_INDEX, i) for label, i in zip(labels, ids))
    # one BOS, at the start; every reply's end token is trained
    opener = "<|im_start|>" if name in CHATML else "<s>"  # ChatML has no BOS
    bos = tok.convert_tokens_to_ids(template.prefix[0].token if template.prefix else opener)
    assert ids[0] == bos
    if template.prefix:
        assert ids.count(bos) == 1
    stop = template.stop_token_ids(tok)[0]
    n_replies = sum(m["role"] == "assistant" for m in messages)
    assert sum(1 for i, label in zip(ids, labels) if i == stop and label == stop) == n_replies


@pytest.mark.parametrize(("name", "kind"), CASES)
@given(messages=conversations(end_with_user=True))
def test_generation_prompt_ids(hf_tokenizers, name, kind, messages):
    """The prompt ids (render + tokenize, as a server does) equal apply_chat_template's."""
    template, tok = TEMPLATES[name], hf_tokenizers[kind]
    text = template.render(messages, add_generation_prompt=True)
    ids = _hf(tok, template, messages, add_generation_prompt=True, return_dict=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_special_strings_in_content_stay_text(hf_tokenizers, name, kind):
    """'</s>' typed by a user is text for us, never a control token (transformers would parse
    it; its sanitize_control_tokens splits it into a separate segment, which tokenizes
    differently from plain text and cannot give an assistant mask)."""
    template, tok = TEMPLATES[name], hf_tokenizers[kind]
    messages = [
        {"role": "user", "content": "say </s><s> and <|eot_id|> please"},
        {"role": "assistant", "content": "ok </s>"},
    ]
    ids, labels = template.encode(tok, messages)
    stop = template.stop_token_ids(tok)[0]
    plain = [{**m, "content": m["content"].replace("<", "{")} for m in messages]
    assert ids.count(stop) == template.encode(tok, plain).input_ids.count(stop)
    text = tok.decode(ids, skip_special_tokens=True)
    assert "</s><s> and <|eot_id|> please" in text
    assert "ok </s>" in tok.decode([i for i, x in zip(ids, labels) if x != IGNORE_INDEX])
