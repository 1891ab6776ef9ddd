"""llamazh.integrations.hf_compat: the moved points, and refusing internals it does not know."""

from __future__ import annotations

import pytest
import torch

import llamazh
from llamazh.integrations import hf_compat
from llamazh.integrations.hf_compat import (
    UnsupportedTransformersError,
    attention_contract,
    cache_arg_name,
    cache_kwargs,
    output_cache,
)
from llamazh.rope import NTKScaling, YaRNScaling
from llamazh.testing import tiny_llama


def _swap_class(module: torch.nn.Module, forward, name: str) -> None:
    """Give ``module`` a subclass of its class (same module path) with another ``forward``."""
    cls = type(module)
    stand_in = type(name, (cls,), {"forward": forward, "__module__": cls.__module__})
    module.__class__ = stand_in


def _renamed_attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, kv_store=None, **kwargs
):
    raise AssertionError("never called: the patch must refuse this class")


def test_a_renamed_attention_argument_is_refused_and_nothing_changes():
    model = tiny_llama()
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    for layer in model.model.layers:
        _swap_class(layer.self_attn, _renamed_attention_forward, "FutureLlamaAttention")
    model.model.layers[0].self_attn.__class__.forward = (
        type(model.model.layers[1].self_attn).__mro__[1].forward
    )  # layer 0 keeps a known forward: the refusal must still be whole
    before = {n: p.clone() for n, p in model.state_dict().items()}
    config_before = model.config.to_dict()
    with pytest.raises(UnsupportedTransformersError) as info:
        llamazh.patch(model, rope=YaRNScaling(4.0, 16))
    message = str(info.value)
    assert "FutureLlamaAttention" in message
    assert "kv_store" in message
    import transformers

    assert f"transformers {transformers.__version__}" in message
    assert "fused=False" in message  # the way out
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert model.config.to_dict() == config_before
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    # the way out works: transformers' own rotary for a strategy it implements, no fused forward
    from llamazh.integrations.hf_rope import patch_rope

    changes = patch_rope(model, YaRNScaling(4.0, 16), fused=False)
    model.model.layers[1].self_attn.__class__.forward = (
        type(model.model.layers[1].self_attn).__mro__[1].forward
    )
    assert model(ids).logits.isfinite().all()
    for change in reversed(changes):
        change.undo()


def test_an_unknown_rotary_forward_is_refused_for_llamazh_only_strategies():
    model = tiny_llama()

    def forward(self, x, positions):  # a renamed argument
        raise AssertionError("never called")

    _swap_class(model.model.rotary_emb, forward, "FutureRotaryEmbedding")
    with pytest.raises(UnsupportedTransformersError, match=r"FutureRotaryEmbedding.*positions"):
        llamazh.patch(model, rope=NTKScaling(2.0))  # would need llamazh's rotary forward
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_attention_contract_of_the_installed_release():
    model = tiny_llama()
    contract = attention_contract(model.model.layers[0].self_attn)
    assert contract.cache_arg == cache_arg_name(model)  # model and attention agree
    assert contract.update_kwargs == (contract.cache_arg == "cache")


def test_cache_arg_name_sees_through_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    name = cache_arg_name(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert cache_arg_name(wrapped) == name
    ids = torch.tensor([[5, 6, 7]])
    out = wrapped(input_ids=ids, **cache_kwargs(wrapped, hf_compat.new_dynamic_cache(model)))
    assert output_cache(out).get_seq_length() == 3


def test_cache_arg_name_refuses_a_forward_without_a_cache():
    with pytest.raises(UnsupportedTransformersError, match=r"Linear.forward takes no KV cache"):
        cache_arg_name(torch.nn.Linear(2, 2))


def test_output_cache_and_crop_last():
    model = tiny_llama()
    out = model(torch.tensor([[5, 6, 7, 8]]), use_cache=True)
    cache = output_cache(out)
    assert cache.get_seq_length() == 4
    hf_compat.crop_last(cache, 3)
    assert cache.get_seq_length() == 1
    with pytest.raises(ValueError, match="n > 0"):
        hf_compat.crop_last(cache, 0)
    assert output_cache(model(torch.tensor([[5]]), use_cache=False)) is None
