"""Generation on SmolLM2: rotary scaling and attention patches keep cached == uncached greedy
decoding, ChatML encodes as the model's own template, speculative greedy == generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llamazh
from llamazh.rope import DynamicNTKScaling, NTKScaling, YaRNScaling
from llamazh.speculative import PromptLookupDrafter, SuffixDrafter, speculative_generate
from llamazh.templates import IGNORE_INDEX, get_template

pytestmark = pytest.mark.slow

NEW_TOKENS = 12
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tokenizer = smollm2
    batch = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return batch["input_ids"], batch["attention_mask"]


@pytest.fixture(scope="module")
def reference(smollm2, prompt):
    """The unpatched model's greedy continuation of ``prompt``, (NEW_TOKENS,)."""
    return _greedy(smollm2[0], prompt)


def _greedy(model, prompt, **kwargs):
    ids, mask = prompt
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=[],  # no early stop, nothing masked: every new position is compared
            do_sample=False,
            **kwargs,
        )
    return out[0, ids.shape[1] :]


# the prompt is 37 tokens: the dynamic strategies switch on past 24, before generation starts
STATIC = {
    "ntk": dict(rope=NTKScaling(2.0)),
    "yarn": dict(rope=YaRNScaling(4.0, 24)),
    "attention": dict(attention="llamazh"),
    "yarn+attention": dict(rope=YaRNScaling(4.0, 24), attention="llamazh"),
    "dynamic-ntk-short": dict(rope=DynamicNTKScaling(2.0, 256), consistent_cache=True),
}
DYNAMIC = {
    "dynamic-ntk": DynamicNTKScaling(2.0, 24),
    "dynamic-yarn": YaRNScaling(2.0, 24, dynamic=True),
}


@pytest.mark.parametrize("name", list(STATIC))
def test_patched_cached_equals_uncached(smollm2, prompt, name):
    model, _ = smollm2
    with llamazh.patch(model, **STATIC[name]) as handle:
        assert handle.describe()
        cached = _greedy(model, prompt)
        uncached = _greedy(model, prompt, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    assert model.config.rope_parameters == {"rope_theta": 100000.0, "rope_type": "default"}


def _stepped_last_logits(model, ids, prefill: int):
    from llamazh.integrations.hf_compat import cache_kwargs, output_cache

    out = model(ids[:, :prefill], use_cache=True)
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], **cache_kwargs(model, output_cache(out)))
    return out.logits[:, -1]


@pytest.mark.parametrize("name", list(DYNAMIC))
def test_dynamic_scaling_consistent_cache(smollm2, prompt, reference, name):
    """Past the original length a dynamic stretch changes with every token. Decoding through
    the cache then differs from a forward of the whole text: keys were rotated at the stretch of
    their time (``consistent_cache=True`` re-rotates them) and, in a 30-layer model, the hidden
    states of earlier tokens were computed under the older stretch (nothing can redo that short
    of recomputing them). So the cached logits are checked to move much closer, not to equal."""
    model, _ = smollm2
    ids = torch.cat([prompt[0], reference[None, :6]], dim=1)  # (1, 43)
    errors = {}
    for consistent in (False, True):
        with torch.no_grad(), llamazh.patch(model, rope=DYNAMIC[name], consistent_cache=consistent):
            full = model(ids, use_cache=False).logits[:, -1]
            errors[consistent] = (full - _stepped_last_logits(model, ids, 22)).abs().max().item()
    assert errors[True] < errors[False] / 2, errors


def test_unpatched_model_is_untouched_after_patches(smollm2, prompt, reference):
    model, tokenizer = smollm2
    with llamazh.patch(model, rope=YaRNScaling(4.0, 24), attention="llamazh"):
        pass
    assert _greedy(model, prompt).tolist() == reference.tolist()
    assert model.config.rope_parameters == {"rope_theta": 100000.0, "rope_type": "default"}
    assert tokenizer.decode(reference, skip_special_tokens=True).strip()


def _truncated(model, layers: int):
    """A draft: the first ``layers`` blocks of the target with its embedding, norm and head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": layers})
    draft = LlamaForCausalLM(config).eval()
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
    }
    draft.load_state_dict(state, strict=False)
    draft.tie_weights()
    return draft


@pytest.mark.parametrize("draft_kind", ["same", "truncated"])
def test_speculative_greedy_equals_generate(smollm2, prompt, reference, draft_kind):
    model, _ = smollm2
    draft = model if draft_kind == "same" else _truncated(model, 6)
    expected = reference
    with torch.no_grad():
        out = speculative_generate(
            model, draft, prompt[0], max_new_tokens=NEW_TOKENS, num_draft_tokens=4
        )
    assert out.new_tokens.reshape(-1).tolist() == expected.tolist()
    if draft_kind == "same":
        assert out.acceptance_rate == 1.0


@pytest.mark.parametrize("drafter", [PromptLookupDrafter, SuffixDrafter])
def test_speculative_stops_where_generate_stops(smollm2, prompt, drafter):
    """No stop argument anywhere: both read generation_config (eos = pad = <|im_end|> = 2)."""
    model, _ = smollm2
    ids, mask = prompt
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=80)
    out = speculative_generate(model, drafter(), ids, max_new_tokens=80)
    assert out.sequences.tolist() == want.tolist()
    assert want[0, -1] == 2 and want.shape[1] < ids.shape[1] + 80  # it stopped at <|im_end|>


FIXTURES = Path(__file__).parent.parent / "templates" / "fixtures"
CHUNKS = ["hello", " world", "LoRA", "42", ",", "?", "你好", "世界", "中文", "。", " ", "\n", "\t"]
text = st.lists(st.sampled_from(CHUNKS), max_size=8).map("".join)


@st.composite
def conversations(draw):
    system = draw(st.one_of(st.none(), st.just(""), text))
    messages = [] if system is None else [{"role": "system", "content": system}]
    for _ in range(draw(st.integers(1, 2))):
        messages += [
            {"role": "user", "content": draw(text)},
            {"role": "assistant", "content": draw(text)},
        ]
    return messages


@settings(max_examples=15)
@given(messages=conversations())
def test_chatml_encode_equals_the_real_tokenizer(smollm2, messages):
    _, tokenizer = smollm2
    ids, labels = get_template("chatml-smollm2").encode(tokenizer, messages)
    assert ids == tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    qwen = (FIXTURES / "qwen2_chat_template.jinja").read_text(encoding="utf-8")
    qwen_ids, _ = get_template("chatml-qwen2").encode(tokenizer, messages)
    theirs = tokenizer.apply_chat_template(messages, chat_template=qwen, return_dict=True)
    assert qwen_ids == theirs["input_ids"]
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert trained.count(2) == sum(m["role"] == "assistant" for m in messages)  # <|im_end|>
    marked = tokenizer.apply_chat_template(
        messages,
        chat_template=get_template("chatml-smollm2").to_jinja(),
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert marked["assistant_masks"] == [int(label != IGNORE_INDEX) for label in labels]
