"""The invariants that catch a transformers upgrade breaking a patch, for every patch mode.

For each mode (every rope strategy, ``consistent_cache=True``, ``attention="llamazh"``, fused
rope through the Triton interpreter, rope + attention together) on Llama, Mistral and Qwen2 at a
GQA shape of 9 query heads over 3 key/value heads:

* cached greedy generation == uncached (dynamic strategies: while the text stays within the
  original length, where they are plain RoPE; past it a KV cache keeps stale rotations by
  design, see tests/rope/test_hf_rope.py);
* patched logits == the natively configured model, where transformers implements the mode;
* ``speculative_generate`` greedy == ``generate``;
* :class:`~llamazh.guidance.ClassifierFreeGuidance` == transformers' own CFG;
* ``undo()`` restores bit-identical logits.

A forward that silently dropped its KV cache (what transformers 5.24's ``past_key_values`` ->
``cache`` rename did to the 5.23 patches) fails the first check in every static mode.
"""

from __future__ import annotations

import functools

import pytest
import torch

import llamazh
from llamazh.guidance import ClassifierFreeGuidance
from llamazh.rope import (
    AdaptiveNTKScaling,
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    NTKScaling,
    YaRNScaling,
)
from llamazh.speculative import PromptLookupDrafter, speculative_generate
from llamazh.testing import tiny_causal_lm

ORIGINAL = 16  # the strategies' original length: generations below go past it
GQA = dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=72)
FAMILIES = ["llama", "mistral", "qwen2"]

# name -> (patch kwargs, natively configured rope_parameters or None, dynamic)
MODES = {
    "linear": (dict(rope=LinearScaling(4.0)), True, False),
    "ntk": (dict(rope=NTKScaling(4.0)), False, False),
    "yarn": (dict(rope=YaRNScaling(4.0, ORIGINAL)), True, False),
    "llama3": (dict(rope=Llama3Scaling(8.0, 1.0, 4.0, ORIGINAL)), True, False),
    "dynamic-ntk": (dict(rope=DynamicNTKScaling(4.0, ORIGINAL)), True, True),
    "adaptive-ntk": (dict(rope=AdaptiveNTKScaling(original_max_position=ORIGINAL)), False, True),
    "dynamic-yarn": (dict(rope=YaRNScaling(4.0, ORIGINAL, dynamic=True)), False, True),
    "consistent-cache": (
        dict(rope=DynamicNTKScaling(4.0, ORIGINAL), consistent_cache=True),
        False,
        True,
    ),
    "attention": (dict(attention="llamazh"), True, False),
    "rope+attention": (dict(rope=YaRNScaling(4.0, ORIGINAL), attention="llamazh"), True, False),
}


def _model(family: str, **overrides):
    return tiny_causal_lm(family, **GQA, **overrides)


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, n, **kwargs):
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=[],
        pad_token_id=0,
        **kwargs,
    )


def _native(family: str, kwargs: dict):
    """The same weights built by transformers itself with the mode's configuration."""
    overrides = {}
    strategy = kwargs.get("rope")
    if strategy is not None:
        base = _model(family).config.rope_parameters["rope_theta"]
        overrides["rope_parameters"] = {"rope_theta": base, **strategy.to_hf()}
        if isinstance(strategy, DynamicNTKScaling):
            overrides["max_position_embeddings"] = strategy.original_max_position
    model = _model(family, **overrides)
    if "attention" in kwargs:
        model.set_attn_implementation("sdpa")  # what the llamazh function runs on a CPU
    return model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are per-op overhead; two OpenMP threads on two shared cores spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.mark.parametrize("mode", list(MODES))
def test_patch_mode_invariants(family, mode):
    kwargs, native_exists, dynamic = MODES[mode]
    model = _model(family)
    ids = _ids(24, batch=2)
    before = model(ids).logits
    handle = llamazh.patch(model, **kwargs)

    # cached == uncached (beyond the original length unless the strategy is dynamic)
    prompt = _ids(5, batch=2, seed=1)
    steps = ORIGINAL - prompt.shape[1] if dynamic else ORIGINAL + 4
    cached = _greedy(model, prompt, steps)
    uncached = _greedy(model, prompt, steps, use_cache=False)
    assert torch.equal(cached, uncached), f"{mode}: cached generation != uncached"

    # the natively configured model, where transformers implements the mode
    if native_exists:
        native = _native(family, kwargs)
        assert torch.equal(model(ids).logits, native(ids).logits)
        assert torch.equal(_greedy(native, prompt, steps), cached)

    # speculative greedy == generate (a prompt-lookup draft: repeated text gets accepted)
    one = torch.cat([_ids(6, seed=2)] * 3, dim=1)[:, : ORIGINAL - 1 if dynamic else 18]
    n_new = ORIGINAL - one.shape[1] if dynamic else 2 * ORIGINAL
    out = speculative_generate(model, PromptLookupDrafter(), one, max_new_tokens=n_new)
    assert torch.equal(out.sequences, _greedy(model, one, n_new)), f"{mode}: speculative"

    # CFG == transformers' own guidance on the patched model
    neg = _ids(3, seed=3)
    want = _greedy(model, one[:, :6], 6, guidance_scale=1.5, negative_prompt_ids=neg)
    cfg = ClassifierFreeGuidance(1.5, model, negative_prompt_ids=neg)
    from transformers import LogitsProcessorList

    got = _greedy(model, one[:, :6], 6, logits_processor=LogitsProcessorList([cfg]))
    assert torch.equal(got, want), f"{mode}: CFG"

    handle.undo()
    assert torch.equal(model(ids).logits, before)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_fused_rope_through_the_interpreter(family, monkeypatch):
    """The Triton rotary kernel (interpreter on a CPU) inside the patched attention forward."""
    import llamazh.integrations.hf_rope as hf_rope
    from llamazh.kernels.flash_attn_common import interpreter_on
    from llamazh.rope import apply_rotary

    if not (torch.cuda.is_available() or interpreter_on()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    calls = []

    @functools.wraps(apply_rotary)
    def triton_rotary(*args, **kwargs):
        calls.append(1)
        return apply_rotary(*args, **{**kwargs, "backend": "triton"})

    monkeypatch.setattr(hf_rope, "apply_rotary", triton_rotary)
    model = _model(family, num_hidden_layers=1)
    prompt = _ids(4, seed=4)
    with llamazh.patch(model, rope=YaRNScaling(4.0, 8)):
        cached = _greedy(model, prompt, 8)
        assert calls
        assert torch.equal(cached, _greedy(model, prompt, 8, use_cache=False))
