"""Which init for the new embedding rows? Initial loss on Chinese right after the resize.

A tiny Llama (llamazh.testing.tiny_llama_config, Llama-2's 32,000 pieces) is trained for a
few hundred steps on en_d2l, then resized to a merged Llama-2 + Chinese vocabulary with each
``resize_embeddings`` init. Reported, before any further training: the loss on held-out
Chinese (the last tenth of zh_d2l) tokenized by the merged tokenizer, per token and per
character (nats/char compares tokenizations), and the English loss with Llama-2 ids (only
the softmax's new rows can change it). The Llama-2-tokenized Chinese loss of the model before
the resize is the reference. A few minutes on 2 CPU cores.

    python benchmarks/resize_init.py [--steps 300] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import sentencepiece as spm
import torch

from llamazh.testing import data_path, tiny_llama_config
from llamazh.tokenizer import (
    RESIZE_INITS,
    merge_sentencepiece,
    resize_embeddings,
    train_sentencepiece,
)

BLOCK = 128


def lines_of(name: str) -> list[str]:
    text = data_path(f"corpus/{name}.txt").read_text(encoding="utf-8")
    return [ln for ln in text.splitlines() if ln.strip()]


def blocks(sp: spm.SentencePieceProcessor, lines: list[str], limit: int | None = None):
    """Lines encoded with BOS, concatenated, cut into (N, BLOCK) blocks; and chars covered."""
    ids, chars, out = [], 0, []
    for line in lines:
        ids += [sp.bos_id(), *sp.encode(line)]
        chars += len(line)
        while len(ids) >= BLOCK:
            out.append(ids[:BLOCK])
            ids = ids[BLOCK:]
        if limit is not None and len(out) >= limit:
            break
    covered = chars * (len(out) * BLOCK) / max(1, len(out) * BLOCK + len(ids))
    return torch.tensor(out), covered


@torch.no_grad()
def loss_of(model, data: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) over all blocks."""
    total, count = 0.0, 0
    for batch in data.split(16):
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--vocab-size", type=int, default=20000)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument(
        "--zh-fraction",
        type=float,
        default=0.0,
        help="share of training batches drawn from the training part of zh_d2l in Llama-2 "
        "ids (0: English only, as the issue specifies; >0: a model that knows the subwords)",
    )
    args = parser.parse_args()
    run = Path(args.run_dir or f"benchmarks/results/resize_init-{time.strftime('%Y%m%d-%H%M%S')}")
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    llama2 = data_path("tokenizers/llama2.model")
    sp_old = spm.SentencePieceProcessor(model_file=str(llama2))
    zh = lines_of("zh_d2l")
    cut = len(zh) - len(zh) // 10
    train_txt = run / "train_zh.txt"
    train_txt.write_text("\n".join(zh[:cut] + lines_of("zh_classical")) + "\n", encoding="utf-8")
    extra = train_sentencepiece(
        train_txt, run / "zh.model", vocab_size=args.vocab_size, overwrite=True
    )
    merged = merge_sentencepiece(llama2, extra, scores="rank")
    sp_new = spm.SentencePieceProcessor(model_proto=merged.proto.SerializeToString())

    english, _ = blocks(sp_old, lines_of("en_d2l"))
    perm = torch.randperm(len(english), generator=torch.Generator().manual_seed(0))
    english_eval, english_train = english[perm[:64]], english[perm[64:]]
    zh_train, _ = blocks(sp_old, zh[:cut])
    zh_new, zh_chars_new = blocks(sp_new, zh[cut:], limit=64)
    zh_old, zh_chars_old = blocks(sp_old, zh[cut:], limit=64 * 2)

    model = LlamaForCausalLM(tiny_llama_config(vocab_size=32000, max_position_embeddings=BLOCK))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps)
    model.train()
    start = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        source = english_train
        if torch.rand((), generator=g).item() < args.zh_fraction:
            source = zh_train
        batch = source[torch.randint(len(source), (8,), generator=g)]
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  train loss {loss.item():.3f}")
    model.eval()
    train_s = time.perf_counter() - start

    rows = []
    ref_zh = loss_of(model, zh_old)
    ref_en = loss_of(model, english_eval)
    tokens_old = zh_old.numel() - len(zh_old)
    rows.append(("none (Llama-2 ids)", ref_zh, ref_zh * tokens_old / zh_chars_old, ref_en))
    for init in RESIZE_INITS:
        resized = copy.deepcopy(model)
        resize_embeddings(
            resized, llama2, merged, init=init, generator=torch.Generator().manual_seed(0)
        )
        loss_zh = loss_of(resized, zh_new)
        tokens_new = zh_new.numel() - len(zh_new)
        rows.append(
            (init, loss_zh, loss_zh * tokens_new / zh_chars_new, loss_of(resized, english_eval))
        )

    # Subword means for the lm_head rows too, which the default avoids.
    resized = copy.deepcopy(model)
    resize_embeddings(resized, llama2, merged, init="subword_mean", head_init="subword_mean")
    loss_zh = loss_of(resized, zh_new)
    tokens_new = zh_new.numel() - len(zh_new)
    rows.append(
        (
            "subword, head subword",
            loss_zh,
            loss_zh * tokens_new / zh_chars_new,
            loss_of(resized, english_eval),
        )
    )

    head = f"{'init':<22}{'zh loss/token':>15}{'zh nats/char':>14}{'en loss/token':>15}"
    lines = [
        f"# resize_init: tiny Llama (hidden 64, 2 layers, Llama-2 vocab) trained {args.steps} "
        f"steps x 8 x {BLOCK} tokens on en_d2l (+ {100 * args.zh_fraction:.0f}% zh_d2l "
        f"batches) in {train_s:.0f} s (CPU, noisy)",
        f"# merged vocabulary: {merged}",
        f"# Chinese: {len(zh_new)} blocks of held-out zh_d2l; uniform over 47k ids would be "
        f"{math.log(merged.final_size):.2f} nats/token",
        "",
        head,
        "-" * len(head),
    ]
    lines += [f"{n:<22}{a:>15.3f}{b:>14.3f}{c:>15.3f}" for n, a, b, c in rows]
    text = "\n".join(lines)
    print(text)
    (run / "table.txt").write_text(text + "\n", encoding="utf-8")
    print(f"\nwrote {run}")


if __name__ == "__main__":
    main()
