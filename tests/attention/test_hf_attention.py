"""The "llamazh" attention implementation inside transformers: same logits as SDPA.

Two paths are tested on CPU: the default one (no kernels: transformers' SDPA function, so
bit-identical), and the kernel path forced onto CPU tensors under TRITON_INTERPRET=1 (what
runs on CUDA: padding -> packed sequences -> Triton varlen kernels), held to the tolerance
rule against an fp64 SDPA reference.
"""

from __future__ import annotations

import pytest
import torch

import llamazh
from llamazh.integrations import hf_attention
from llamazh.testing import assert_close, tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.fixture
def kernel_device(monkeypatch):
    """Where the kernel path runs: CUDA, else CPU tensors under TRITON_INTERPRET=1. Any fall
    back to SDPA fails the test."""
    from llamazh.kernels.flash_attn_common import interpreter_on

    if torch.cuda.is_available():
        device = "cuda"
    elif interpreter_on():
        device = "cpu"
        monkeypatch.setattr(hf_attention, "_KERNELS_ON_CPU", True)
    else:
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    real = hf_attention._fallback

    def no_fallback(module, *args, **kwargs):
        if module.config._attn_implementation == "llamazh":
            raise AssertionError("the kernel path fell back to SDPA")
        return real(module, *args, **kwargs)

    monkeypatch.setattr(hf_attention, "_fallback", no_fallback)
    return torch.device(device)


def _batch(left: bool):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (3, 13), generator=gen)
    mask = torch.ones(3, 13, dtype=torch.long)
    for row, pad in ((0, 4), (1, 0), (2, 9)):
        if pad:
            mask[row, :pad] = 0 if left else 1
            if not left:
                mask[row, 13 - pad :] = 0
    return ids, mask


def _logits(model, impl, dtype=torch.float32, **inputs):
    device = next(iter(inputs.values())).device
    model = model.to(device, dtype)
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits.double()


def test_registered_under_both_registries():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    hf_attention.register()
    hf_attention.register()  # idempotent
    assert AttentionInterface._global_mapping["llamazh"] is hf_attention.llamazh_attention_forward
    assert AttentionMaskInterface._global_mapping["llamazh"] is hf_attention.llamazh_attention_mask
    assert "flash" not in hf_attention.NAME


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="llamazh"
    )
    assert model.config._attn_implementation == "llamazh"
    model.set_attn_implementation("sdpa")
    model.set_attn_implementation("llamazh")
    assert model.config._attn_implementation == "llamazh"


def test_patch_is_undoable():
    model = tiny_llama()
    with llamazh.patch(model, attention="llamazh") as handle:
        assert model.config._attn_implementation == "llamazh"
        assert "sdpa" in handle.describe()[0]
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        llamazh.patch(model, attention="nope")


@pytest.mark.parametrize("left", [True, False])
def test_cpu_path_is_sdpa_bit_for_bit(left):
    ids, mask = _batch(left)
    model = tiny_llama()
    ours = _logits(model, "llamazh", input_ids=ids, attention_mask=mask)
    sdpa = _logits(model, "sdpa", input_ids=ids, attention_mask=mask)
    assert torch.equal(ours, sdpa)


def _assert_matches_sdpa(model, keep, **inputs):
    ours = _logits(model, "llamazh", **inputs)[keep]
    ref = _logits(model, "sdpa", torch.float64, **inputs)[keep]
    base = _logits(model, "eager", **inputs)[keep]  # same math in fp32, plain PyTorch
    assert_close(ours, ref, base, name="logits")


@pytest.mark.parametrize("left", [True, False])
def test_kernel_path_padding(kernel_device, left):
    ids, mask = (t.to(kernel_device) for t in _batch(left))
    _assert_matches_sdpa(tiny_llama(), mask.bool(), input_ids=ids, attention_mask=mask)


def test_kernel_path_packed_sequences(kernel_device):
    lengths = [5, 7, 1, 4]
    ids = torch.randint(3, 256, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(kernel_device)
    ids = ids.to(kernel_device)
    seen = []
    real = hf_attention._varlen

    def spy(*args, **kwargs):
        seen.append(args[3][0].tolist())
        return real(*args, **kwargs)

    keep = torch.ones(1, sum(lengths), dtype=torch.bool, device=kernel_device)
    hf_attention._varlen = spy
    try:
        _assert_matches_sdpa(tiny_llama(), keep, input_ids=ids, position_ids=position_ids,
                             use_cache=False)  # fmt: skip
    finally:
        hf_attention._varlen = real
    assert seen and seen[0] == [0, 5, 12, 13, 17]  # ran packed, per position_ids segment


def test_kernel_path_generate_with_cache(kernel_device):
    ids, mask = (t.to(kernel_device) for t in _batch(left=True))
    model = tiny_llama()
    runs = {}
    for impl, dtype in (
        ("llamazh", torch.float32),
        ("sdpa", torch.float64),
        ("eager", torch.float32),
    ):
        model = model.to(kernel_device, dtype)
        model.set_attn_implementation(impl)
        runs[impl] = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
            return_dict_in_generate=True, output_logits=True, pad_token_id=0,
        )  # fmt: skip
    assert torch.equal(runs["llamazh"].sequences, runs["sdpa"].sequences)
    for step, (a, r, b) in enumerate(zip(*(runs[i].logits for i in ("llamazh", "sdpa", "eager")))):
        assert_close(a.double(), r.double(), b.double(), name=f"step {step} logits")


def test_mask_function_shapes(kernel_device, monkeypatch):
    from transformers.masking_utils import causal_mask_function

    mask2 = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    make = hf_attention.llamazh_attention_mask
    kw = dict(mask_function=causal_mask_function)
    on_kernels = make(2, 3, 3, device=kernel_device, attention_mask=mask2.to(kernel_device), **kw)
    assert on_kernels.shape == (2, 3)  # flash-style padding mask
    monkeypatch.setattr(hf_attention, "_KERNELS_ON_CPU", False)
    assert make(2, 3, 3, device="cpu", attention_mask=mask2, **kw).shape == (2, 1, 3, 3)


def test_kernel_path_sliding_window_with_padding(kernel_device):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=4, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    ids, mask = (t.to(kernel_device) for t in _batch(left=True))
    _assert_matches_sdpa(model, mask.bool(), input_ids=ids, attention_mask=mask)


def test_padding_mask_without_kernels_expands_like_sdpa(monkeypatch):
    # dropout while training (or D > 256) leaves the kernel path with a flash-style 2-D mask:
    # it must be expanded exactly as SDPA's mask function would
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask = _batch(left=True)[1].bool()
    attn = tiny_llama().model.layers[0].self_attn
    monkeypatch.setattr(hf_attention, "_kernel_path", lambda device: False)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(3, 4, 13, 16, generator=gen)
    key, value = torch.randn(2, 3, 2, 13, 16, generator=gen)
    ours, _ = hf_attention.llamazh_attention_forward(attn, query, key, value, mask, scaling=0.25)
    mask4 = sdpa_mask(
        batch_size=3, q_length=13, kv_length=13, mask_function=causal_mask_function,
        attention_mask=mask, allow_is_causal_skip=False,
    )  # fmt: skip
    want, _ = sdpa_attention_forward(attn, query, key, value, mask4, scaling=0.25)
    assert torch.equal(ours[mask], want[mask])
