"""Does bf16 autocast buy tokens per CPU second on this CPU, at the same loss? Both arms of the
main job's step 3 on SmolLM2-135M-Instruct.

Arms: the control (LoRA r=16 on the seven projections, original tokenizer) and the extended
model (``extend_bpe`` + ``resize_embeddings(untie=True)`` + LoRA + new rows). For each arm and
precision (fp32; ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and loss),
``--steps`` AdamW steps on the same batches (4 x 256 tokens of Chinese training text) from the
same start: process CPU seconds per step (median after one warm-up step), tokens per CPU
second, and the fp32 loss on a fixed held-out batch after the steps (a precision that trains
as well ends at the same loss).

    python benchmarks/autocast_cpu.py [--steps 6] [--new-tokens 5000]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from llamazh.pretrained import load_smollm2
from llamazh.tokenizer import chinese_held_out_split, extend_bpe, resize_embeddings
from llamazh.training import prepare_for_training

BLOCK, BATCH = 256, 4


def blocks(tokenizer, lines: list[str], n: int) -> torch.Tensor:
    ids: list[int] = []
    for line in lines:
        ids += [0, *tokenizer(line, add_special_tokens=False).input_ids]
        if len(ids) >= n * BLOCK:
            break
    return torch.tensor(ids[: n * BLOCK]).view(n, BLOCK)


def run(model, prepared, data, held, steps: int, bf16: bool) -> tuple[float, float]:
    opt = torch.optim.AdamW(prepared.param_groups(1e-3, embedding_lr=2e-3))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    times = []
    model.train()
    for step in range(steps + 1):
        batch = data[step * BATCH : (step + 1) * BATCH]
        start = time.process_time()
        with ctx():
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.process_time() - start)
    model.eval()
    with torch.no_grad():
        held_loss = float(model(input_ids=held, labels=held).loss)
    return statistics.median(times), held_loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=5000)
    args = ap.parse_args(argv)
    split = chinese_held_out_split()
    train = list(split.train)
    random.Random(0).shuffle(train)
    base, tok = load_smollm2()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        extend_bpe(tok, train[:4000], new_tokens=args.new_tokens).save(Path(d) / "tok")
        ext = AutoTokenizer.from_pretrained(Path(d) / "tok")
    rows = []
    for arm in ("control", "extended"):
        t = tok if arm == "control" else ext
        data = blocks(t, train[4000:], (args.steps + 1) * BATCH)
        held = blocks(t, list(split.held_out["zh_d2l"]), 2)
        for bf16 in (False, True):
            torch.manual_seed(0)
            model = copy.deepcopy(base)
            if arm == "control":
                prepared = prepare_for_training(model, rank=16, alpha=32, dropout=0.0,
                                                embeddings="frozen", lm_head="frozen")  # fmt: skip
            else:
                new_ids = resize_embeddings(model, tok, ext, untie=True)
                prepared = prepare_for_training(model, rank=16, alpha=32, dropout=0.0,
                                                embeddings="new_rows", lm_head="new_rows",
                                                new_token_ids=new_ids)  # fmt: skip
            sec, loss = run(model, prepared, data, held, args.steps, bf16)
            rows.append((arm, "bf16 autocast" if bf16 else "fp32", sec, BATCH * BLOCK / sec, loss))
            print(rows[-1], flush=True)
    print("\n| arm | precision | CPU s/step | tokens/CPU s | held-out loss after |")
    print("|---|---|---|---|---|")
    for arm, prec, sec, tps, loss in rows:
        print(f"| {arm} | {prec} | {sec:.2f} | {tps:.0f} | {loss:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
