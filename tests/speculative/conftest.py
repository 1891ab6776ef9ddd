"""Shared helpers for the speculative tests: reference greedy decoding, a trained tiny pair."""

from __future__ import annotations

import pytest
import torch

from llamazh.testing import data_path, tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Decoding tiny models is dominated by per-op overhead, and two OpenMP threads on a shared
    two-core machine spin against each other (measured 25x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hf_greedy(model, input_ids, max_new_tokens, eos_token_id=None, **kwargs):
    """The target's own greedy output, as transformers' generate produces it (``eos_token_id``
    None: the model's ``generation_config`` decides, as it does for speculative_generate)."""
    if eos_token_id is not None:
        kwargs["eos_token_id"] = eos_token_id
    return model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **kwargs,
    )


@pytest.fixture(scope="session")
def hf_greedy():
    """``hf_greedy(model, ids, max_new_tokens, eos_token_id=None, **generate_kwargs)``."""
    return _hf_greedy


def _train_bytes(model, data: torch.Tensor, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - 65, (16,), generator=gen)
        batch = torch.stack([data[s : s + 65] for s in starts.tolist()])  # (16, 65)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="session")
def trained_pair():
    """A byte-level target (2 layers, hidden 64) and a 1-layer hidden-32 draft, each trained a
    few seconds on the English corpus, so their predictions are related; plus test prompts."""
    path = data_path("corpus/en_d2l.txt")
    if path is None:
        pytest.skip("data/corpus/en_d2l.txt is not in this checkout")
    text = path.read_bytes()[:200_000]
    data = torch.tensor(list(text), dtype=torch.long)
    target = tiny_llama(seed=0)
    draft = tiny_llama(
        seed=1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    _train_bytes(target, data, steps=150, seed=0)
    _train_bytes(draft, data, steps=150, seed=1)
    prompts = [data[i : i + 24].unsqueeze(0) for i in (1000, 50_000, 120_000)]
    return target, draft, prompts
