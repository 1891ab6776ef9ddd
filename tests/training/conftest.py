"""Shared helpers for the training tests: tiny models and adapters that are not no-ops."""

from __future__ import annotations

import pytest
import torch

from llamazh.testing import tiny_llama


@pytest.fixture
def trainer_runs() -> None:
    """Skip where transformers' Trainer cannot run (accelerate too old for it, e.g. the
    low-end pins: transformers 5.17 with accelerate 1.1). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("trainer_runs")``."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from llamazh.training.train import trainer_problem

    problem = trainer_problem()
    if problem:
        pytest.skip(problem)


VOCAB = 256
NEW_IDS = list(range(200, 256))  # the "vocabulary extension": the last 56 rows


def _perturb(prepared, seed: int = 1, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in prepared.named_trainable().values():
            for _, p in group:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


@pytest.fixture
def perturb():
    """perturb(prepared, seed=1): give every trainable tensor a random non-zero offset so the
    adapter changes the logits (a fresh LoRA is a no-op)."""
    return _perturb


@pytest.fixture
def new_ids():
    return list(NEW_IDS)


@pytest.fixture
def make_model():
    """make_model(tied=False, seed=0, **overrides) -> a tiny LlamaForCausalLM (fp32, eval)."""

    def make(tied: bool = False, seed: int = 0, **overrides):
        overrides.setdefault("vocab_size", VOCAB)
        return tiny_llama(seed=seed, tie_word_embeddings=tied, **overrides)

    return make


@pytest.fixture
def input_ids():
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def make_peft():
    """make_peft(model, lora_config) -> PEFT's own model with every trainable tensor offset by
    seeded noise (so that its adapter is not a no-op), warnings silenced."""
    import warnings

    def make(model, config, seed: int = 3):
        from peft import get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        return peft_model

    return make
