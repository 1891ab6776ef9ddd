"""Continue pre-training with LoRA + new-row embeddings in a plain PyTorch loop (no Trainer).

The Chinese-LLaMA recipe in miniature: extend Llama-2's vocabulary with Chinese pieces,
resize a tiny Llama to the merged vocabulary (new rows initialised from their sub-pieces),
then train LoRA on every projection plus only the new rows of embed_tokens (and the lm_head)
on ``data/corpus/zh_d2l.txt`` and watch held-out Chinese perplexity fall. A few minutes on a
CPU.

The lm_head trains in full by default: the stand-in base here is random, so its frozen old
lm_head rows give every old token (ASCII, punctuation, the Chinese characters Llama-2 already
had) a near-uniform probability that no hidden state can sharpen (the final RMSNorm fixes the
hidden norm). With a real pre-trained base, ``--lm-head new_rows`` is the memory-lean choice.

    python examples/train_lora_embeddings.py --out-dir runs/train_lora_embeddings --steps 300
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llamazh.testing import data_path
from llamazh.tokenizer import has_cjk, merge_sentencepiece, resize_embeddings, train_sentencepiece
from llamazh.training import causal_lm_loss, group_into_blocks, prepare_for_training, save_adapter


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = blocks[i : i + batch]
        total += causal_lm_loss(model(ids).logits, ids, reduction="sum").item()
        count += ids.numel() - ids.shape[0]
    model.train()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/train_lora_embeddings")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--zh-vocab-size", type=int, default=3000)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--embedding-lr", type=float, default=2e-2)
    parser.add_argument("--lm-head", choices=("full", "new_rows", "frozen"), default="full")
    args = parser.parse_args()
    torch.manual_seed(0)
    llama2, corpus = data_path("tokenizers/llama2.model"), data_path("corpus/zh_d2l.txt")
    if llama2 is None or corpus is None:
        raise SystemExit("the bundled data/ directory is missing; run from a clone of llamazh")
    out = Path(args.out_dir)

    # 1. the merged vocabulary: Llama-2's 32,000 pieces, then Chinese pieces appended
    zh = train_sentencepiece(
        corpus, out / "zh.model", vocab_size=args.zh_vocab_size, overwrite=True
    )
    merged = merge_sentencepiece(llama2, zh, scores="rank", piece_filter=has_cjk)
    sp = spm.SentencePieceProcessor(model_proto=merged.proto.SerializeToString())
    print(merged)

    # 2. a tiny "pre-trained" Llama with Llama-2's vocabulary, resized to the merged one
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    new_ids = resize_embeddings(model, llama2, merged)  # int64 ids of the rows just added
    print(f"resized to {model.config.vocab_size} rows, {len(new_ids)} new")

    # 3. data: every line a document ending in EOS (Chinese-LLaMA-2), cut into fixed blocks
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    blocks = group_into_blocks(sp.encode(lines), args.block_size, eos_token_id=sp.eos_id())
    blocks = blocks[torch.randperm(len(blocks))]
    held_out, train = blocks[:32], blocks[32:]
    print(f"{len(train)} training blocks of {args.block_size} tokens, {len(held_out)} held out")

    # 4. LoRA on q,k,v,o,gate,up,down + only the new rows of embed_tokens (+ the lm_head)
    prepared = prepare_for_training(
        model,
        rank=16,
        alpha=32,
        dropout=0.05,
        embeddings="new_rows",
        lm_head=args.lm_head,
        new_token_ids=new_ids,
    )
    print(prepared.report())
    optimizer = torch.optim.AdamW(
        prepared.param_groups(args.lr, weight_decay=0.01, embedding_lr=args.embedding_lr)
    )
    warmup = max(1, args.steps // 20)  # linear warm-up, then cosine decay to 10%
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.55 + 0.45 * math.cos(math.pi * min(1.0, s / args.steps)))
        ),
    )

    model.train()
    print(f"step    0  held-out perplexity {perplexity(model, held_out, args.batch):10.1f}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (args.batch,))
        ids = train[idx]
        loss = causal_lm_loss(model(ids).logits, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], 1.0
        )
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps:
            ppl = perplexity(model, held_out, args.batch)
            print(
                f"step {step:4d}  train loss {loss.item():.3f}  held-out perplexity {ppl:10.1f}  "
                f"({time.perf_counter() - start:.0f} s)"
            )
    path = save_adapter(prepared, out / "adapter", overwrite=True)
    print(f"saved the PEFT-format adapter to {path}")


if __name__ == "__main__":
    main()
