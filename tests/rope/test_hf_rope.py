"""Patching transformers models: equality with natively built models, undo, save/load,
generation with the KV cache, and the dynamic-scaling cache inconsistency."""

from __future__ import annotations

import pytest
import torch

import llamazh
from llamazh.integrations.hf_compat import cache_kwargs, output_cache
from llamazh.integrations.hf_rope import from_pretrained, patch_rope, strategy_of
from llamazh.rope import (
    AdaptiveNTKScaling,
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    NoScaling,
    NTKScaling,
    YaRNScaling,
    from_hf,
)
from llamazh.testing import tiny_llama

KNOWN = [
    NoScaling(),
    LinearScaling(4.0),
    DynamicNTKScaling(2.0, 16),
    YaRNScaling(4.0, 16),
    YaRNScaling(8.0, 32, mscale=0.707, mscale_all_dim=0.707, beta_fast=16.0),
    Llama3Scaling(8.0, 1.0, 4.0, 32),
]
LLAMAZH_ONLY = [
    NTKScaling(4.0),
    AdaptiveNTKScaling(original_max_position=16),
    YaRNScaling(4.0, 16, dynamic=True),
]
DYNAMIC = [DynamicNTKScaling(4.0, 16), YaRNScaling(8.0, 16, dynamic=True)]


def _ids(n: int = 40, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _native(strategy):
    """A tiny Llama built by transformers itself with the strategy's rope_parameters."""
    params = {"rope_theta": 10000.0, **strategy.to_hf()}
    max_pos = strategy.original_max_position if isinstance(strategy, DynamicNTKScaling) else 256
    return tiny_llama(rope_parameters=params, max_position_embeddings=max_pos)


@pytest.mark.parametrize("strategy", KNOWN, ids=repr)
def test_patched_equals_native(strategy):
    ids = _ids()
    model = tiny_llama()
    before = model(ids).logits
    handle = llamazh.patch(model, rope=strategy)
    patched = model(ids).logits
    assert torch.equal(patched, _native(strategy)(ids).logits)
    handle.undo()
    assert torch.equal(model(ids).logits, before)
    assert model.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert model.config.max_position_embeddings == 256
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("strategy", KNOWN[1:], ids=repr)
def test_save_and_stock_reload(strategy, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = _ids()
    model = tiny_llama()
    llamazh.patch(model, rope=strategy)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no llamazh involved
    assert torch.equal(reloaded(ids).logits, expected)
    assert strategy_of(reloaded.config) == strategy


@pytest.mark.parametrize("strategy", LLAMAZH_ONLY, ids=repr)
def test_llamazh_only_strategies_save_and_load(strategy, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = _ids()
    model = tiny_llama()
    handle = llamazh.patch(model, rope=strategy)
    expected = model(ids).logits
    if strategy.is_dynamic:  # 40 > 16: the dynamic strategies are engaged
        with llamazh.patch(tiny_llama(), rope=NoScaling()) as plain:
            assert not torch.allclose(plain.model(ids).logits, expected)
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert '"requires": "llamazh"' in config and '"rope_type": "llamazh_' in config
    with pytest.raises(KeyError, match="llamazh_"):
        AutoModelForCausalLM.from_pretrained(tmp_path)  # stock transformers refuses it
    loaded = from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids).logits, expected)
    handle.undo()


@pytest.mark.parametrize("strategy", [YaRNScaling(4.0, 16), NTKScaling(2.0)], ids=repr)
def test_generation_with_cache(strategy):
    model = tiny_llama()
    with llamazh.patch(model, rope=strategy):
        prompt = _ids(6)
        cached = model.generate(prompt, max_new_tokens=14, do_sample=False)  # 20 > 16
        uncached = model.generate(prompt, max_new_tokens=14, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        # and the cached logits equal one full forward of the whole text
        out = model(cached[:, :-1], use_cache=True)
        assert torch.equal(out.logits[:, -1].argmax(-1), cached[:, -1])


def _decode_last_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill ``prefill`` tokens, then feed the rest one by one through the KV cache."""
    out = model(ids[:, :prefill], use_cache=True)
    cache = output_cache(out)
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], **cache_kwargs(model, cache))
        cache = output_cache(out)
    return out.logits[:, -1]


@pytest.mark.parametrize("strategy", DYNAMIC, ids=repr)
def test_dynamic_scaling_and_the_kv_cache(strategy):
    """transformers' dynamic rule rotates each cached key with the frequencies of the length
    at which it was written: decoding through the cache past the original length disagrees
    with a forward of the whole text. ``consistent_cache=True`` re-rotates the cached keys
    with the current frequencies (one layer: exactly the no-cache attention scores)."""
    ids = _ids(48, batch=1)
    model = tiny_llama(num_hidden_layers=1)
    with llamazh.patch(model, rope=strategy):
        full = model(ids, use_cache=False).logits[:, -1]
        stale = (full - _decode_last_logits(model, ids, prefill=8)).abs().max()

    changes = patch_rope(model, strategy, consistent_cache=True)
    full = model(ids, use_cache=False).logits[:, -1]
    stepped = _decode_last_logits(model, ids, prefill=8)
    for change in reversed(changes):
        change.undo()
    fresh = (full - stepped).abs().max()
    assert fresh < 1e-5  # GEMMs of other shapes: a few ulps, not a different rotation
    assert stale > 30 * fresh, (stale, fresh)  # the known inconsistency


def test_seed_long_context_configs_load_and_run():
    """The seed's 16K (linear 4) and 64K (YaRN 16 over 4096) models, at tiny width."""
    sixteen = dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4})
    sixty_four = dict(
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "rope_theta": 1e4,
                         "original_max_position_embeddings": 4096},
    )  # fmt: skip
    ids = _ids(24)
    for max_pos, fields, strategy in (
        (16384, sixteen, LinearScaling(4.0)),
        (65536, sixty_four, YaRNScaling(16.0, 4096)),
    ):
        native = tiny_llama(max_position_embeddings=max_pos, **fields)
        assert strategy_of(native.config) == strategy
        patched = tiny_llama(max_position_embeddings=max_pos)
        with llamazh.patch(patched, rope=strategy):
            assert torch.equal(patched(ids).logits, native(ids).logits)
            assert patched.generate(ids[:, :4], max_new_tokens=2, do_sample=False).shape == (2, 6)


def test_qwen2_and_mistral_families():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    ids = _ids(30)
    for config_class, model_class, extra in (
        (Qwen2Config, Qwen2ForCausalLM, {}),
        (MistralConfig, MistralForCausalLM, {"sliding_window": 8}),
    ):
        strategy = YaRNScaling(4.0, 16)
        torch.manual_seed(0)
        model = model_class(config_class(**small, **extra)).eval()
        torch.manual_seed(0)
        params = {"rope_theta": model.config.rope_parameters["rope_theta"], **strategy.to_hf()}
        native = model_class(config_class(**small, **extra, rope_parameters=params)).eval()
        with llamazh.patch(model, rope=strategy) as handle:
            assert any("forward -> llamazh rotary" in line for line in handle.describe())
            assert torch.equal(model(ids).logits, native(ids).logits)


def test_errors():
    with pytest.raises(TypeError, match=r"rope must be a llamazh\.rope strategy"):
        llamazh.patch(tiny_llama(), rope={"rope_type": "linear"})
    with pytest.raises(ValueError, match="no rotary embedding"):
        bare = torch.nn.Linear(2, 2)
        bare.config = tiny_llama().config
        patch_rope(bare, NoScaling())
    with pytest.raises(ValueError, match="consistent_cache=True needs"):
        bare = tiny_llama()
        for layer in bare.model.layers:
            layer.self_attn.q_norm = torch.nn.Identity()  # looks like Qwen3 now
        patch_rope(bare, DynamicNTKScaling(2.0, 16), consistent_cache=True)
    assert bare.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert from_hf({"rope_type": "default"}) == NoScaling()


@pytest.mark.gpu
def test_fused_kernel_in_patched_model_on_gpu():
    from llamazh.testing import assert_close

    ids = _ids(300).cuda()
    strategy = YaRNScaling(4.0, 64)
    reference = _native(strategy).cuda()(ids).logits  # fp32 transformers
    baseline = _native(strategy).cuda().bfloat16()(ids).logits  # bf16 transformers
    model = tiny_llama().cuda().bfloat16()
    with llamazh.patch(model, rope=strategy):
        patched = model(ids).logits
        generated = model.generate(ids[:, :8], max_new_tokens=16, do_sample=False)
    assert_close(patched, reference, baseline)
    assert generated.shape == (2, 24)


def test_patched_model_through_the_kernel(device, monkeypatch):
    """The CUDA path of the patched attention (Triton kernel; the interpreter on CPU)."""
    import functools

    import llamazh.integrations.hf_rope as hf_rope
    from llamazh.rope import apply_rotary
    from llamazh.testing import assert_close

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return apply_rotary(*args, **{**kwargs, "backend": "triton"})

    monkeypatch.setattr(hf_rope, "apply_rotary", functools.wraps(apply_rotary)(counting))
    strategy = YaRNScaling(4.0, 8)
    ids = _ids(12).to(device)
    reference = _native(strategy).double().to(device)(ids).logits
    native = _native(strategy).to(device)
    model = tiny_llama().to(device)
    with llamazh.patch(model, rope=strategy):
        assert_close(model(ids).logits, reference, native(ids).logits)
        assert len(calls) == 2  # one fused q/k rotation per layer
        ours = model.generate(ids[:, :6], max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, native.generate(ids[:, :6], max_new_tokens=4, do_sample=False))


def test_a_failure_half_way_leaves_the_model_untouched(monkeypatch):
    import llamazh.integrations.hf_rope as hf_rope

    model = tiny_llama()
    ids = _ids(8)
    before = model(ids).logits
    monkeypatch.setattr(hf_rope, "_attention_forward", None)  # binding it will fail
    with pytest.raises(TypeError):
        llamazh.patch(model, rope=NTKScaling(2.0))
    assert model.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(ids).logits, before)


def test_rope_and_attention_patched_together():
    from llamazh.testing import assert_close

    strategy = YaRNScaling(4.0, 16)
    ids = _ids(40)
    reference = _native(strategy).double()(ids).logits
    native = _native(strategy)(ids).logits
    model = tiny_llama()
    with llamazh.patch(model, rope=strategy, attention="llamazh"):
        assert_close(model(ids).logits, reference, native)
        assert model.generate(ids[:, :6], max_new_tokens=4, do_sample=False).shape == (2, 10)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}


def test_patches_undone_out_of_order_are_refused_and_in_order_restore_bit_for_bit():
    model = tiny_llama()
    ids = _ids(12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    config = model.config.to_dict()
    before = model(ids).logits
    first = llamazh.patch(model, rope=YaRNScaling(4.0, 16))
    second = llamazh.patch(model, rope=LinearScaling(2.0), attention="eager")
    patched = model(ids).logits
    with pytest.raises(RuntimeError, match="newest first"):
        first.undo()
    assert not first.undone and torch.equal(model(ids).logits, patched)  # nothing changed
    second.undo()
    first.undo()
    assert model.config.to_dict() == config
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(ids).logits, before)
    with pytest.raises(RuntimeError, match="already"):
        first.undo()
    # a new patch after both were undone is independent of them
    with llamazh.patch(model, rope=LinearScaling(2.0)):
        assert not torch.equal(model(ids).logits, before)
    assert torch.equal(model(ids).logits, before)
