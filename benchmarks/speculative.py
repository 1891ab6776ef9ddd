"""Speculative decoding on a CPU: llamazh vs target-only decoding vs transformers' assisted
generation and prompt lookup.

Models (trained here, cached under ``<out>/models-*``; ``--retrain`` to redo):

* tokens: the Llama-2 SentencePiece model on ``data/corpus/zh_d2l.txt``, re-indexed to the
  pieces that occur (a compact vocabulary keeps the LM heads and the training cheap);
* draft: Llama, 2 layers, hidden 256, distilled from the target (KL to its next-token
  distributions on the corpus), as production draft models are;
* target: a 4-layer hidden-256 Llama trained from scratch (another seed, twice the depth),
  then widened 4x to hidden 1024 / 16 heads / FFN 2816 by an exact function-preserving
  expansion (Net2WiderNet, Chen et al. 2016: every unit and head copied 4 times, incoming
  weights divided by 4). CPU training budgets cannot train a 50M-parameter model in minutes;
  widening gives a target whose per-token cost is that of a real 50M model (all its FLOPs
  are executed) and whose predictions are those of a better model than the draft trained on
  the same text, which is what speculative decoding depends on. Say so when quoting numbers.

FLOPs per token (matmuls, 2 * multiply-adds): per layer ``2 * (4 d^2 + 3 d f)`` plus the head
``2 d V``. Decoding runs in bfloat16 (on CPUs with AVX512-BF16 a matmul of 1-8 rows costs about
what one row costs, as on a GPU; fp32 MKL GEMMs with few rows do not) on ``--threads`` threads.

Run: ``PYTHONPATH=. python benchmarks/speculative.py`` (about 5 minutes on 2 cores, most of it
training the first time). Methods run round robin over the prompts and are timed by process
CPU time by default (``--clock wall`` for wall time), so that other jobs on a shared machine
bias no method; ``tokens/target forward`` does not depend on timing at all. Prints a table,
writes ``table.md``, ``results.csv`` and ``speedup_vs_draft_tokens.png`` into a new run
directory under ``benchmarks/results/``.

``--smollm2`` runs ``benchmarks/speculative_smollm2.py`` instead: SmolLM2-135M-Instruct on
input-grounded (repeat, edit, extract, summarise with quotes) and open-ended chat prompts,
``generate`` vs transformers' prompt lookup vs llamazh's prompt lookup and suffix drafters and
a useless draft model, greedy outputs checked identical.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch

from llamazh._atomic import atomic_write_bytes, atomic_write_text
from llamazh.speculative import PromptLookupDrafter, speculative_generate
from llamazh.testing import data_path

ROOT = Path(__file__).resolve().parent


def llama(vocab: int, d: int, layers: int, heads: int, ffn: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def flops_per_token(model) -> int:
    c = model.config
    layer = 2 * (
        4 * c.hidden_size * c.num_attention_heads * 64 + 3 * c.hidden_size * c.intermediate_size
    )
    return c.num_hidden_layers * layer + 2 * c.hidden_size * c.vocab_size


def widen(model, r: int):
    """Exact function-preserving widening by ``r`` (every unit/head copied, inputs / r)."""
    c = model.config
    wide = llama(
        c.vocab_size,
        c.hidden_size * r,
        c.num_hidden_layers,
        c.num_attention_heads * r,
        c.intermediate_size * r,
        seed=0,
    )
    src = model.state_dict()
    out = {}
    for name, w in src.items():
        if "norm" in name:
            out[name] = w.repeat(r)
        elif name.endswith("embed_tokens.weight"):
            out[name] = w.repeat(1, r)
        elif name == "lm_head.weight":
            out[name] = w.repeat(1, r) / r
        else:  # (out, in) projections: tile r x r, inputs divided by r
            out[name] = w.repeat(r, r) / r
    wide.load_state_dict(out)
    return wide


def tokens_of_corpus(vocab: int):
    """Corpus ids re-indexed to the ``vocab - 1`` most frequent pieces, the rest -> 0 (unk)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(data_path("tokenizers/llama2.model")))
    text = data_path("corpus/zh_d2l.txt").read_text(encoding="utf-8")
    ids = torch.tensor(
        [t for line in text.splitlines() if line.strip() for t in sp.encode(line)],
        dtype=torch.long,
    )
    counts = torch.bincount(ids, minlength=sp.get_piece_size())
    kept = counts.argsort(descending=True)[: vocab - 1]
    used = torch.cat([torch.tensor([sp.unk_id()]), kept])  # compact id -> piece id
    compact = torch.zeros(sp.get_piece_size(), dtype=torch.long)
    compact[kept] = torch.arange(1, vocab)
    return sp, compact[ids], used


def train(model, data, steps: int, seed: int, teacher=None, batch: int = 8, seq: int = 128):
    """AdamW on random windows; with ``teacher``, distil its next-token distributions (KL)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen).tolist()
        x = torch.stack([data[s : s + seq] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if teacher is None:
                loss = model(input_ids=x, labels=x).loss
            else:
                with torch.no_grad():
                    target = teacher(input_ids=x).logits.float().log_softmax(-1)
                logq = model(input_ids=x).logits.float().log_softmax(-1)
                loss = (
                    torch.nn.functional.kl_div(logq, target, log_target=True, reduction="batchmean")
                    / seq
                )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            print(f"  step {step:4d} loss {loss.item():.3f} ({elapsed:.0f} s)", flush=True)
    return model.eval()


def get_models(out: Path, steps: int, retrain: bool, vocab: int, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    sp, data, used = tokens_of_corpus(vocab)
    held_out = int(0.95 * data.numel())
    cache = out / f"models-v{vocab}-steps{steps}-kd"
    if retrain or not (cache / "target" / "config.json").exists():
        print(f"training on {held_out} tokens, vocabulary {len(used)} (compact)")
        v = len(used)
        print("target core: 4 layers, hidden 256 (widened 4x afterwards)", flush=True)
        core = train(llama(v, 256, 4, 4, 704, seed=2), data[:held_out], steps, seed=2)
        print("draft: 2 layers, hidden 256, distilled from the target core", flush=True)
        draft = llama(v, 256, 2, 4, 704, seed=1)
        draft = train(draft, data[:held_out], steps, seed=1, teacher=core)
        target = widen(core, 4)
        draft.save_pretrained(cache / "draft")
        target.save_pretrained(cache / "target")
    draft = LlamaForCausalLM.from_pretrained(cache / "draft", dtype=dtype).eval()
    target = LlamaForCausalLM.from_pretrained(cache / "target", dtype=dtype).eval()
    return sp, used, data[held_out:], target, draft


def run_methods(target, draft, prompts, max_new: int, ks: list[int], clock):
    """Rows (method, sampling, k, outputs, seconds, accepted, drafted, verify forwards).

    Round robin: every method runs on prompt 0, then every method on prompt 1, ..., so that
    load from other processes on a shared machine spreads over all methods alike.
    """
    gen_kwargs = dict(max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=0)

    def hf(**kw):
        def run(i, ids):
            torch.manual_seed(i)
            out = target.generate(ids, attention_mask=torch.ones_like(ids), **gen_kwargs, **kw)
            return out, 0, 0, 0

        return run

    def ours(drafter, **kw):
        def run(i, ids):
            gen = torch.Generator().manual_seed(i)
            res = speculative_generate(
                target, drafter, ids, max_new_tokens=max_new, generator=gen, **kw
            )
            return res.sequences, res.accepted, res.drafted, res.steps

        return run

    greedy = dict(do_sample=False)
    sample = dict(do_sample=True, temperature=0.7)
    target_only = "target only (transformers generate)"
    spec_draft = "llamazh speculative, draft model"
    assisted = "transformers assisted generation"
    methods = [
        (target_only, "greedy", "-", hf(**greedy)),
        (target_only, "T=0.7", "-", hf(**sample)),
    ]
    for name, kw in (("greedy", greedy), ("T=0.7", sample)):
        methods.append((spec_draft, name, "adaptive", ours(draft, **kw)))
        methods.append((spec_draft, name, "throughput", ours(draft, schedule="throughput", **kw)))
        methods.append((assisted, name, "heuristic", hf(assistant_model=draft, **kw)))
    methods.append(
        ("llamazh speculative, prompt lookup", "greedy", "adaptive", ours(PromptLookupDrafter()))
    )
    methods.append(
        ("transformers prompt lookup", "greedy", "10", hf(prompt_lookup_num_tokens=10, **greedy))
    )
    for k in ks:
        methods.append(
            (spec_draft, "greedy", str(k), ours(draft, num_draft_tokens=k, schedule="constant"))
        )

    totals = [[[], 0.0, 0, 0, 0] for _ in methods]  # outputs, seconds, accepted, drafted, steps
    for i, ids in enumerate(prompts):
        for (_, _, _, run), total in zip(methods, totals):
            t = clock()
            out, acc, dr, steps = run(i, ids)
            total[1] += clock() - t
            total[0].append(out)
            total[2] += acc
            total[3] += dr
            total[4] += steps
        print(f"  prompt {i + 1}/{len(prompts)} done", flush=True)
    return [(*m[:3], *total) for m, total in zip(methods, totals)]


def main() -> None:
    import sys

    if "--smollm2" in sys.argv:  # the real-model run: input-grounded and open chat prompts
        sys.argv.remove("--smollm2")
        from speculative_smollm2 import main as smollm2_main

        return smollm2_main()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "speculative")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: process CPU time (robust to other jobs on a shared machine; meant for "
        "--threads 1, it sums over threads); wall: wall time",
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sp, used, held_out, target, draft = get_models(
        args.out, args.train_steps, args.retrain, args.vocab, getattr(torch, args.dtype)
    )
    stride = (held_out.numel() - args.prompt_tokens) // args.prompts
    prompts = [
        held_out[i * stride : i * stride + args.prompt_tokens].unsqueeze(0)
        for i in range(args.prompts)
    ]
    ratio = flops_per_token(target) / flops_per_token(draft)
    print(
        f"target {flops_per_token(target) / 1e6:.0f} MFLOP/token, draft "
        f"{flops_per_token(draft) / 1e6:.1f} MFLOP/token ({ratio:.1f}x fewer)"
    )
    with torch.inference_mode():  # warm up both models and all code paths
        speculative_generate(target, draft, prompts[0], max_new_tokens=8)
        target.generate(prompts[0], max_new_tokens=4, pad_token_id=0)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = run_methods(target, draft, prompts, args.max_new_tokens, args.ks, clock)

    n_tokens = args.max_new_tokens * len(prompts)
    base = {r[1]: n_tokens / r[4] for r in rows if r[0].startswith("target only")}
    reference = {r[1]: r[3] for r in rows if r[0].startswith("target only")}
    header = (
        f"| method | decoding | draft tokens | tokens/s ({args.clock}) | speedup | acceptance "
        "| tokens/target forward | greedy output == target |"
    )
    lines = [header, "|" + "---|" * 8]
    table = []
    for method, mode, k, outs, secs, acc, dr, steps in rows:
        tps = n_tokens / secs
        same = "-"
        if mode == "greedy":
            same = (
                f"{sum(torch.equal(a, b) for a, b in zip(outs, reference['greedy']))}/{len(outs)}"
            )
        rate = f"{acc / dr:.2f}" if dr else "-"
        # target-only decoding: one token per forward; transformers' helpers do not report it
        per_forward = f"{n_tokens / steps:.2f}" if steps else ("1.00" if k == "-" else "-")
        table.append(
            dict(
                method=method,
                decoding=mode,
                draft_tokens=k,
                tokens_per_s=round(tps, 2),
                speedup=round(tps / base[mode], 3),
                acceptance=rate,
                tokens_per_target_forward=per_forward,
                identical=same,
            )
        )
        lines.append(
            f"| {method} | {mode} | {k} | {tps:.1f} | {tps / base[mode]:.2f}x | {rate} "
            f"| {per_forward} | {same} |"
        )
    sample = sp.decode(used[reference["greedy"][0][0, args.prompt_tokens :]].tolist())
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    import transformers

    env = (
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch "
        f"{torch.__version__}, transformers {transformers.__version__}, git {sha}; {args.dtype}; "
        f"{len(prompts)} prompts x {args.max_new_tokens} new tokens; target/draft FLOPs "
        f"{ratio:.1f}x; {args.clock} clock; shared noisy machine"
    )
    text = "\n".join([*lines, "", env, "", f"target greedy sample: {sample!r}"])
    print(text)

    run = args.out / time.strftime("run-%Y%m%d-%H%M%S")
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "table.md", text + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*table[0], "env"])
    writer.writeheader()
    for row in table:
        writer.writerow({**row, "env": env})
    atomic_write_text(run / "results.csv", buf.getvalue())
    atomic_write_text(run / "args.json", json.dumps(vars(args), default=str, indent=1))
    plot(table, args.ks, run / "speedup_vs_draft_tokens.png")
    print(f"written to {run}")


def plot(table, ks, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    const = {
        r["draft_tokens"]: r["speedup"]
        for r in table
        if r["method"].startswith("llamazh speculative, draft") and r["decoding"] == "greedy"
    }
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [const[str(k)] for k in ks], "o-", label="llamazh, constant k (greedy)")
    ax.axhline(const["adaptive"], color="C1", ls="--", label="llamazh, adaptive (greedy)")
    ax.axhline(const["throughput"], color="C3", ls="-.", label="llamazh, throughput (greedy)")
    hf = next(
        r["speedup"]
        for r in table
        if r["method"].startswith("transformers assisted") and r["decoding"] == "greedy"
    )
    ax.axhline(hf, color="C2", ls=":", label="transformers assisted (greedy)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("draft tokens per step")
    ax.set_ylabel("speedup over target-only decoding")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    main()
