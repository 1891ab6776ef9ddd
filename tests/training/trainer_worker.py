"""One transformers Trainer run of a prepared tiny model, for tests/training/test_engines.py.

    python trainer_worker.py OUT ENGINE TIED MODE            # ENGINE: single
    torchrun --nproc_per_node 2 trainer_worker.py OUT ENGINE TIED MODE   # ddp | zero2 | zero3

The global batch is the same whatever the number of processes; dropout is off so that every
engine computes the same trajectory. Writes OUT/losses.json and OUT/logits.pt (the trained
model's logits on fixed ids, computed on every rank: ZeRO-3 gathers in forward) and the
Trainer's checkpoint OUT/checkpoint-STEPS (an adapter).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

STEPS = 4
GLOBAL_BATCH = 4
NEW_IDS = list(range(200, 256))


def dataset(n: int = 32) -> list[dict[str, torch.Tensor]]:
    """Two sequences repeated (half of their tokens new ids): a loss that falls in 4 steps."""
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 256, (16,), generator=gen) for _ in range(2)]
    return [{"input_ids": seqs[i % 2], "labels": seqs[i % 2].clone()} for i in range(n)]


def probe_ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(5))


def deepspeed_config(stage: int) -> dict:
    """The shipped example config (examples/deepspeed/zero{2,3}.json): tested as users get it."""
    root = Path(__file__).resolve().parents[2]
    return json.loads((root / "examples" / "deepspeed" / f"zero{stage}.json").read_text())


def main(out: Path, engine: str, tied: bool, mode: str, dtype: torch.dtype = torch.float32) -> None:
    from transformers import Trainer, TrainingArguments

    from llamazh.testing import tiny_llama
    from llamazh.training import prepare_for_training

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)  # the LoRA init draws from the global generator
    model = tiny_llama(seed=0, vocab_size=256, tie_word_embeddings=tied)
    prepare_for_training(
        model, rank=4, alpha=8, dropout=0.0, embeddings=mode, lm_head=mode, new_token_ids=NEW_IDS
    )
    model.to(dtype)  # the fp64 reference starts from the same fp32 values
    zero = {"zero2": 2, "zero3": 3}.get(engine)
    args = TrainingArguments(
        str(out),
        max_steps=STEPS,
        save_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        seed=3,
        logging_steps=1,
        disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None,
        deepspeed=deepspeed_config(zero) if zero else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args, train_dataset=dataset())
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.eval()
    with torch.no_grad():
        logits = model(probe_ids()).logits
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "losses.json").write_text(json.dumps(losses))
        torch.save(logits, out / "logits.pt")
    # a process group left to interpreter shutdown can abort there ("terminate called without
    # an active exception", SIGABRT) while gloo's threads still run: close it first
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "tied", sys.argv[4])
