"""The model-shaped training step of ``gpu_suite.py``: ``"llamazh"`` attention plus the fused
RoPE against ``"sdpa"`` on the same randomly initialised model and batch.

Shapes: SmolLM2-135M's config (30 layers, hidden 576, 9 / 3 heads, D = 64) and four layers of
Llama-2-7B's (hidden 4096, 32 heads, D = 128, MLP 11008, vocab 32000); bf16, B = 4, S = 4096
(16k tokens a step). One step = forward with labels + backward (grads reset to None before
each; no optimizer: it would cost both the same). Reported: tokens/s over the timed steps,
the peak allocated GiB during them, and the per-token losses of one batch against an fp32
copy of the model under the tolerance rule (``llamazh.testing.compare``: llamazh's error at
most 2x the sdpa bf16 model's).
"""

from __future__ import annotations

import copy
import gc
import time

from gpu_child import Ctx

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
LLAMA2_7B_4_LAYERS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=4,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)


def part_model(ctx: Ctx) -> None:
    if ctx.smoke:
        shapes, batch, seq, steps = [("tiny", TINY)], 2, 32, 1
    else:
        shapes = [("SmolLM2-135M", SMOLLM2_135M), ("Llama-2-7B x4 layers", LLAMA2_7B_4_LAYERS)]
        batch, seq, steps = 4, 4096, 5
    ctx.note(
        f"bf16 (fp32 on CPU), B={batch}, S={seq}, forward + backward, {steps} timed steps "
        "after 2 warm-up steps; llamazh = attn_implementation 'llamazh' + fused RoPE"
    )
    for name, shape in shapes:
        case = f"{name} B={batch} S={seq}"
        if ctx.expired(case):
            return
        try:
            _one(ctx, case, shape, batch, seq, steps)
        except Exception as exc:
            ctx.failed(case, "llamazh vs sdpa", "tokens/s", "tokens/s", exc)
        finally:
            gc.collect()
            if ctx.cuda:
                import torch

                torch.cuda.empty_cache()


def _one(ctx: Ctx, case: str, shape: dict, batch: int, seq: int, steps: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import llamazh
    from llamazh.rope import NoScaling
    from llamazh.testing import compare

    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), attn_implementation="sdpa")
    model = model.to(dtype).train()
    gen = torch.Generator(device=ctx.device).manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=ctx.device, generator=gen)

    def step():
        for p in model.parameters():
            p.grad = None
        model(input_ids=ids, labels=ids).loss.backward()

    def measure(provider: str) -> torch.Tensor:
        for _ in range(2):  # warm-up: compiles, autotuning, allocator
            step()
        _sync(ctx)
        for p in model.parameters():
            p.grad = None
        if ctx.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(ctx)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else float("nan")
        for p in model.parameters():
            p.grad = None
        ctx.add(
            case,
            provider,
            "tokens/s",
            batch * seq * steps / seconds,
            "tokens/s",
            ms=round(1e3 * seconds / steps, 2),
        )
        ctx.add(case, provider, "peak GiB", peak, "GiB")
        return _token_losses(model, ids)

    base = measure("sdpa")
    handle = llamazh.patch(model, rope=NoScaling(), attention="llamazh")
    try:
        ours = measure("llamazh")
    finally:
        handle.undo()
    for p in model.parameters():
        p.grad = None
    reference = copy.deepcopy(model).float()  # sdpa in fp32: the reference
    ref = _token_losses(reference, ids)
    del reference
    result = compare(ours, ref, base, name="per-token loss")
    for provider, losses in (("fp32 reference", ref), ("sdpa", base), ("llamazh", ours)):
        ctx.add(case, provider, "mean loss", float(losses.mean()), "nats")
    ctx.add(case, "llamazh", "loss rule", 1.0 if result.ok else 0.0, "ok", note=str(result))
    ctx.note(f"{case}: {result}")


def _token_losses(model, ids):
    """(B * (S - 1),) fp32 next-token losses of one batch, no autograd."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, S - 1, V)
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
        )


def _sync(ctx: Ctx) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()
