"""Worker for test_distributed.py (not collected: no test_ prefix).

Trains a tiny prepared Llama for a few AdamW steps on a fixed global batch and writes the
global loss per step and the saved adapter. Under torchrun (WORLD_SIZE > 1) every decoder
layer and the root are sharded with FSDP2 (``fully_shard``) on a CPU mesh with gloo, and
each rank takes its slice of the global batch; otherwise one process takes the whole batch.

    torchrun --nproc_per_node 2 tests/training/fsdp_worker.py OUT_DIR
    python tests/training/fsdp_worker.py OUT_DIR --dtype float64
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from llamazh.testing import tiny_llama
from llamazh.training import causal_lm_loss, prepare_for_training, save_adapter

STEPS = 4
GLOBAL_BATCH = 4
SEQ = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    train(args.out, getattr(torch, args.dtype))


def train(out: Path, dtype: torch.dtype) -> None:
    """Train and write ``out/losses.json`` and ``out/adapter`` (rank 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
    if world > 1:
        torch.set_num_threads(1)

    model = tiny_llama(seed=0, dtype=dtype, vocab_size=256).train()
    prepared = prepare_for_training(
        model,
        rank=4,
        alpha=8,
        dropout=0.0,
        embeddings="new_rows",
        lm_head="full",
        new_token_ids=range(200, 256),
        adapter_dtype=dtype,
    )
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # parameter groups after sharding: fully_shard replaces the parameters by DTensors
    optimizer = torch.optim.AdamW(prepared.param_groups(1e-2, weight_decay=0.01))

    data = torch.randint(3, 256, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    data[:, ::3] = data[:, ::3] % 56 + 200  # plenty of new-row tokens
    per_rank = GLOBAL_BATCH // world
    local = data[rank * per_rank : (rank + 1) * per_rank]
    losses = []
    for _ in range(STEPS):
        # equal token counts per rank: the mean of local means is the global mean, and FSDP
        # averages gradients over ranks, so this is the global-batch step
        loss = causal_lm_loss(model(local).logits, local)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        global_loss = loss.detach().double()
        if world > 1:
            torch.distributed.all_reduce(global_loss)
            global_loss /= world
        losses.append(global_loss.item())
    save_adapter(prepared, out / "adapter", overwrite=True)
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
