"""speculative_generate reads the model's generation_config as generate does: stop ids (one or a
list), pad, max/min lengths; greedy output equals generate's with no argument passed, on chat
prompts rendered with the chatml-smollm2, llama2-chat and llama3 templates."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import GenerationConfig

from llamazh.integrations.hf_generation import resolve_generation
from llamazh.speculative import ModelDrafter, PromptLookupDrafter, speculative_generate
from llamazh.templates import get_template
from llamazh.testing import tiny_llama

VOCAB = 264
# template -> (special token ids in the tiny vocabulary, byte offset, generation_config fields)
# Ids mirror the real models where they fit: SmolLM2 (<|im_end|> = 2 = pad), Llama-2 (</s> = 2),
# Llama-3 (two stop ids, no pad).
TEMPLATES = {
    "chatml-smollm2": (
        {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2},
        3,
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    ),
    "llama2-chat": ({"<s>": 1, "</s>": 2}, 3, {"bos_token_id": 1, "eos_token_id": 2}),
    "llama3": (
        {
            "<|begin_of_text|>": 256,
            "<|end_of_text|>": 257,
            "<|start_header_id|>": 258,
            "<|end_header_id|>": 259,
            "<|eot_id|>": 260,
        },
        0,
        {"bos_token_id": 256, "eos_token_id": [257, 260]},
    ),
}
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Repeat: the cat sat on the mat, the cat sat on the mat."},
]


def _encode(text: str, specials: dict[str, int], offset: int) -> torch.Tensor:
    """A byte-level tokenizer with the template's special tokens as single ids."""
    ids: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        ids += [specials[piece]] if piece in specials else [b + offset for b in piece.encode()]
    return torch.tensor([ids])


def _model_that_stops(name: str, stop: int, after: int, seed: int = 0):
    """A tiny Llama with the template's generation_config whose greedy output says ``stop``
    where it would say its ``after``-th generated token (its head row copies that token's,
    scaled up), so the stop ids are really produced; and the chat prompt."""
    specials, offset, fields = TEMPLATES[name]
    model = tiny_llama(seed, vocab_size=VOCAB)
    model.generation_config = GenerationConfig(**fields)
    ids = _encode(get_template(name).render(CHAT), specials, offset)
    free = _generate(model, ids, max_new_tokens=after + 1, eos_token_id=[], pad_token_id=0)
    token = int(free[0, ids.shape[1] + after])
    with torch.no_grad():
        head = model.lm_head.weight
        head[stop] = head[token] * 1.5
    return model, ids


def _generate(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("drafter", ["lookup", "model"])
def test_defaults_from_generation_config_stop_where_generate_stops(name, drafter):
    stops = TEMPLATES[name][2]["eos_token_id"]
    for stop in [stops] if isinstance(stops, int) else stops:
        model, ids = _model_that_stops(name, stop, after=6)
        draft = PromptLookupDrafter() if drafter == "lookup" else tiny_llama(1, vocab_size=VOCAB)
        want = _generate(model, ids, max_new_tokens=40)
        assert want[0, -1] == stop and want.shape[1] < ids.shape[1] + 40  # it really stopped
        out = speculative_generate(model, draft, ids, max_new_tokens=40)
        assert out.sequences.tolist() == want.tolist()
        # max_length from the call and from the config; transformers' default of 20 new tokens
        for kwargs in ({"max_length": ids.shape[1] + 4}, {}):
            assert (
                speculative_generate(model, draft, ids, **kwargs).sequences.tolist()
                == _generate(model, ids, **kwargs).tolist()
            )
        model.generation_config.max_length = ids.shape[1] + 5
        assert speculative_generate(model, draft, ids).sequences.tolist() == (
            _generate(model, ids).tolist()
        )
        # min_new_tokens masks the stop ids for a while, as generate's processor does
        model.generation_config.min_new_tokens = 9
        got = speculative_generate(model, draft, ids, max_new_tokens=20)
        assert got.sequences.tolist() == _generate(model, ids, max_new_tokens=20).tolist()
        assert got.num_new_tokens > 7


def test_explicit_arguments_win_over_the_config():
    model, ids = _model_that_stops("chatml-smollm2", 2, after=3)
    for kwargs in ({"eos_token_id": []}, {"eos_token_id": [2, 5]}, {"max_new_tokens": 2}):
        want = _generate(model, ids, max_new_tokens=kwargs.pop("max_new_tokens", 15), **kwargs)
        out = speculative_generate(
            model,
            PromptLookupDrafter(),
            ids,
            max_new_tokens=want.shape[1] - ids.shape[1],
            **kwargs,
        )
        assert out.sequences.tolist() == want.tolist()
    config = GenerationConfig(eos_token_id=[], max_new_tokens=11)
    out = speculative_generate(model, PromptLookupDrafter(), ids, generation_config=config)
    assert out.sequences.tolist() == _generate(model, ids, generation_config=config).tolist()
    assert out.num_new_tokens == 11


def test_resolved_sampling_defaults_are_generates():
    model = tiny_llama(0)
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_k=0)
    got = resolve_generation(model, 5)
    assert (got.do_sample, got.temperature, got.top_k, got.top_p) == (True, 0.6, None, 1.0)
    got = resolve_generation(tiny_llama(0), 5, do_sample=True)
    assert (got.top_k, got.max_new_tokens, got.eos_token_ids, got.pad_token_id) == (50, 20, (2,), 0)
    assert resolve_generation(tiny_llama(0), 250).max_new_tokens == 6  # max_position_embeddings


@pytest.mark.parametrize(
    ("fields", "kwargs", "match"),
    [
        ({"num_beams": 2}, {}, "num_beams"),
        ({"no_repeat_ngram_size": 3}, {}, "no_repeat_ngram_size"),
        ({}, {"eos_token_id": "2"}, "eos_token_id"),
        ({}, {"eos_token_id": [2, -1]}, "eos_token_id"),
        ({}, {"pad_token_id": 1.5}, "pad_token_id"),
        ({}, {"max_length": 3}, "max_length"),
        ({}, {"max_new_tokens": 0}, "max_new_tokens"),
        ({}, {"min_new_tokens": -1}, "min_new_tokens"),
        ({}, {"do_sample": True, "temperature": 0.0}, "temperature"),
    ],
)
def test_settings_generate_would_apply_and_we_cannot_are_refused(fields, kwargs, match):
    model = tiny_llama(0)
    model.generation_config = GenerationConfig(**fields)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match=match):
        speculative_generate(model, PromptLookupDrafter(), ids, **kwargs)


def test_a_model_drafter_keeps_working_across_calls_with_default_stops():
    model, ids = _model_that_stops("llama2-chat", 2, after=4)
    drafter = ModelDrafter(tiny_llama(1, vocab_size=VOCAB))
    for _ in range(2):
        out = speculative_generate(model, drafter, ids, max_new_tokens=30)
        assert out.sequences.tolist() == _generate(model, ids, max_new_tokens=30).tolist()
