"""How far do rotary scaling strategies stretch a model's context without any training?

Trains (or reuses) a tiny Llama on the bundled Chinese and English corpora with a 256-token
context on the CPU, then measures perplexity at 256, 512, 1024 and 2048 tokens on held-out text
for each strategy applied with ``llamazh.patch(model, rope=...)``. Prints a table, writes a CSV
and a plot into the run directory (default ``benchmarks/results/rope_long_context``).

    PYTHONPATH=$PWD python benchmarks/rope_long_context.py [--train-seconds 300] [--retrain]

Tokens: the Llama-2 SentencePiece model, then the 2,047 most frequent training ids kept (the
rest mapped to one "other" id) so the softmax stays small enough for a few CPU minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch

import llamazh
from llamazh._atomic import atomic_dir, atomic_write_text
from llamazh.evaluation import perplexity_by_length
from llamazh.rope import (
    AdaptiveNTKScaling,
    DynamicNTKScaling,
    LinearScaling,
    NoScaling,
    NTKScaling,
    YaRNScaling,
)
from llamazh.testing import data_path

TRAIN_LENGTH = 256
VOCAB = 2048
CORPORA = ("zh_d2l.txt", "en_d2l.txt", "zh_classical.txt")
EVAL_CORPORA = ("zh_d2l.txt", "en_d2l.txt")


def strategies(target: int) -> dict[str, object]:
    """Each strategy configured to reach ``target`` tokens from the 256 trained."""
    scale = target / TRAIN_LENGTH  # 8 for 2048
    return {
        "none": NoScaling(),
        f"linear (PI) x{scale:g}": LinearScaling(scale),
        f"NTK alpha={scale:g}": NTKScaling(scale),
        f"dynamic NTK x{scale:g}": DynamicNTKScaling(scale, TRAIN_LENGTH),
        "adaptive NTK coeff=1": AdaptiveNTKScaling(coeff=1.0, original_max_position=TRAIN_LENGTH),
        f"YaRN x{scale:g}": YaRNScaling(scale, TRAIN_LENGTH),
        f"dynamic YaRN <=x{scale:g}": YaRNScaling(scale, TRAIN_LENGTH, dynamic=True),
    }


def tokenize(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Per corpus: 95% train / 5% held out, as compact ids; plus the id map (kept Llama ids)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(data_path("tokenizers/llama2.model")))
    train, held = {}, {}
    for name in CORPORA:
        lines = data_path(f"corpus/{name}").read_text(encoding="utf-8").splitlines()
        ids: list[int] = []
        for piece in sp.encode([line for line in lines if line.strip()]):
            ids.extend([*piece, sp.eos_id()])  # EOS after every line, as the seed recipe does
        cut = int(len(ids) * 0.95)
        train[name], held[name] = torch.tensor(ids[:cut]), torch.tensor(ids[cut:])
    counts = torch.bincount(torch.cat(list(train.values())), minlength=sp.get_piece_size())
    kept = counts.argsort(descending=True)[: VOCAB - 1]
    lookup = torch.full((sp.get_piece_size(),), VOCAB - 1, dtype=torch.long)
    lookup[kept] = torch.arange(VOCAB - 1)
    return {k: lookup[v] for k, v in train.items()}, {k: lookup[v] for k, v in held.items()}, kept


def train(
    train_ids: dict[str, torch.Tensor], seconds: float, seed: int, log: list, model=None
) -> object:
    """Train ``model`` (a new tiny Llama when ``None``) for ``seconds`` of wall time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=TRAIN_LENGTH,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
    )  # fmt: skip
    model = model.train() if model is not None else LlamaForCausalLM(config)
    first_step = log[-1]["step"] + 1 if log else 0
    stream = torch.cat(list(train_ids.values()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    batch, start, step = 8, time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds:
        # linear warm-up over 20 steps, then cosine over the time budget down to 10%
        lr = (
            2e-3 * min(1.0, (step + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * elapsed / seconds))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, stream.numel() - TRAIN_LENGTH - 1, (batch,), generator=gen)
        ids = torch.stack([stream[s : s + TRAIN_LENGTH] for s in starts.tolist()])  # (B, 256)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0:
            value = float(loss.detach())
            log.append(
                {"step": first_step + step, "seconds": round(elapsed, 1), "loss": round(value, 4)}
            )
            print(f"step {step:5d}  {elapsed:6.0f}s  loss {value:.3f}", flush=True)
        step += 1
    return model.eval()


def eval_stream(held: dict[str, torch.Tensor], block: int) -> torch.Tensor:
    """Alternate ``block``-token pieces of each held-out corpus so every window mixes both."""
    pieces = [held[name].split(block) for name in EVAL_CORPORA]
    mixed = [p for pair in zip(*pieces) for p in pair if p.numel() == block]
    return torch.cat(mixed)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rope_long_context"))
    parser.add_argument("--train-seconds", type=float, default=600.0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--windows", type=int, default=6, help="windows per length")
    parser.add_argument(
        "--score-last",
        type=int,
        default=None,
        help="score only the last N tokens of each window (default: all)",
    )
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument(
        "--more-seconds", type=float, default=0.0, help="continue training the cached model"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM

    model_dir = args.out / "tiny_llama"
    train_ids, held, kept = tokenize(args.seed)
    fresh = args.retrain or not (model_dir / "config.json").is_file()
    if fresh or args.more_seconds > 0:
        log: list = []
        model, seconds = None, args.train_seconds
        if not fresh:
            log = json.loads((model_dir / "training_log.json").read_text())
            model, seconds = AutoModelForCausalLM.from_pretrained(model_dir), args.more_seconds
        model = train(train_ids, seconds, args.seed + len(log), log, model)
        with atomic_dir(model_dir, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            (tmp / "training_log.json").write_text(json.dumps(log, indent=1))
            (tmp / "kept_llama2_ids.json").write_text(json.dumps(kept.tolist()))
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()

    stream = eval_stream(held, max(args.lengths))
    table: dict[str, dict[int, float]] = {}
    for name, strategy in strategies(max(args.lengths)).items():
        start = time.perf_counter()
        with llamazh.patch(model, rope=strategy):
            table[name] = perplexity_by_length(
                model, stream, args.lengths, max_windows=args.windows, score_last=args.score_last
            )
        cells = "  ".join(f"{table[name][n]:9.2f}" for n in args.lengths)
        print(f"{name:26s} {cells}   ({time.perf_counter() - start:.0f}s)", flush=True)

    header = f"{'strategy':26s} " + "  ".join(f"{n:>9d}" for n in args.lengths)
    scored = f"last {args.score_last} tokens" if args.score_last else "all tokens"
    title = (
        f"perplexity on held-out zh_d2l+en_d2l, {args.windows} windows per length, {scored} "
        f"scored; trained at {TRAIN_LENGTH} tokens"
    )
    lines = [title, header, "-" * len(header)]
    for name, row in table.items():
        lines.append(f"{name:26s} " + "  ".join(f"{row[n]:9.2f}" for n in args.lengths))
    text = "\n".join(lines)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "table.txt", text + "\n")
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "length", "perplexity", "device", "torch", "git_sha"])
        for name, row in table.items():
            for n, ppl in row.items():
                writer.writerow([name, n, f"{ppl:.4f}", platform.processor() or "cpu",
                                 torch.__version__, git_sha()])  # fmt: skip
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in table.items():
        ax.plot(list(row), list(row.values()), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axvline(TRAIN_LENGTH, color="grey", linestyle=":", label="training length")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("Tiny Llama trained at 256 tokens: context extension without training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "perplexity_by_length.png", dpi=120)
    print(f"wrote {args.out}/table.txt, results.csv, perplexity_by_length.png")


if __name__ == "__main__":
    main()
