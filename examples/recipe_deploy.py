"""Steps 5-7 of ``examples/recipe.py``: long context, the standalone merged model, speculative
decoding; and the loss-curve plot."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from recipe_adapt import CONTINUE, EOS, Context, answer, load, new_llama, sp
from recipe_lib import Run, distill, plot, smooth, table, to_blocks

import llamazh
from llamazh.evaluation import perplexity_by_length
from llamazh.rope import AdaptiveNTKScaling, NoScaling, NTKScaling, YaRNScaling
from llamazh.speculative import speculative_generate
from llamazh.training import load_adapter, merge_adapters


# ---- 5 -----------------------------------------------------------------------------------
def step_long_context(c: Context) -> dict:
    s = c.sizes

    def run(d: Path) -> dict:
        model = load(c.run.path("04_sft") / "cpt_merged")
        merged = sp(c.merged_model)
        stream = []
        for line in c.zh_heldout:
            stream.extend([*merged.encode(line), EOS])
        lengths = [s.block * k for k in (1, 2, 4, 8)]
        strategies = {
            "none": NoScaling(),
            "NTK (alpha 8)": NTKScaling(alpha=8.0),
            "adaptive NTK": AdaptiveNTKScaling(),
            "YaRN (x8)": YaRNScaling(factor=8.0, original_max_position=s.block),
        }
        results = {}
        for name, strategy in strategies.items():
            with llamazh.patch(model, rope=strategy):
                ppl = perplexity_by_length(
                    model, torch.tensor(stream), lengths, max_windows=4, score_last=s.block // 2
                )
            results[name] = [ppl[n] for n in lengths]
        rows = [
            {"rope": k, **{f"{n} ({n // s.block}x)": f"{v:.1f}" for n, v in zip(lengths, vs)}}
            for k, vs in results.items()
        ]
        print(
            f"  perplexity of the last {s.block // 2} tokens of 4 held-out windows per length (the"
            " same tokens at every length, only the context grows); no training at any length"
        )
        print(table(rows, list(rows[0])))
        plot(
            c.run.root / "long_context.png",
            {k: (lengths, v) for k, v in results.items()},
            xlabel="tokens",
            ylabel="perplexity",
            title=f"trained on {s.block} tokens",
            logy=True,
        )
        best = min(results, key=lambda k: results[k][-1])
        headline = f"ppl at 8x: none {results['none'][-1]:.0f}, best {best} {results[best][-1]:.0f}"
        return {"lengths": lengths, "perplexity": results, "headline": headline}

    return c.run.step("05_long", "5. Long context: perplexity vs length per rotary scaling", run)


# ---- 6 -----------------------------------------------------------------------------------
def step_merge(c: Context) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def run(d: Path) -> dict:
        out = d / "model"
        merge_adapters(
            c.run.path("03_cpt") / "resized_base",
            [c.run.path("03_cpt") / "adapter", c.run.path("04_sft") / "adapter"],
            out,
        )
        for f in c.tokenizer_dir.iterdir():
            if not (out / f.name).exists():
                (out / f.name).write_bytes(f.read_bytes())
        stock = AutoModelForCausalLM.from_pretrained(out).eval()
        tokenizer = AutoTokenizer.from_pretrained(out)
        reference = load(c.run.path("04_sft") / "cpt_merged")
        load_adapter(reference, c.run.path("04_sft") / "adapter")
        ids = tokenizer("深度学习是机器学习的一个分支", return_tensors="pt").input_ids
        with torch.no_grad():
            diff = (stock(ids).logits - reference(ids).logits).abs().max().item()
        text = answer(stock, tokenizer, f"{CONTINUE}\n{c.zh_heldout[1][:30]}")
        print(
            f"  wrote {out} ({sum(1 for _ in out.iterdir())} files); stock from_pretrained "
            f"vs unmerged adapters: max |logit diff| {diff:.2e}"
        )
        print(f"  generation from the stock-loaded model: {text!r}")
        return {"max_logit_diff": diff, "generation": text}

    return c.run.step("06_merge", "6. Merge the adapters into a standalone model", run)


# ---- 7 -----------------------------------------------------------------------------------
def step_speculative(c: Context) -> dict:
    from transformers import AutoTokenizer

    s = c.sizes

    def run(d: Path) -> dict:
        target = load(c.run.path("06_merge") / "model")
        tokenizer = AutoTokenizer.from_pretrained(c.run.path("06_merge") / "model")
        blocks = to_blocks(c.zh_train, sp(c.merged_model).encode, EOS, s.block)
        torch.manual_seed(1)
        draft = new_llama(target.config.vocab_size, s.draft_hidden, 1, 2, s.block)
        opt = torch.optim.AdamW(draft.parameters(), lr=3e-3, weight_decay=0.01)
        losses = distill(
            draft,
            target,
            blocks,
            steps=s.draft_steps,
            batch_size=s.batch,
            optimizer=opt,
            desc="distil the draft",
        )
        draft.save_pretrained(d / "draft")
        prompts = [tokenizer(x[:24], return_tensors="pt").input_ids for x in c.zh_heldout[:3]]
        sweep = (1, 2, 4, 6) if s.spec_new_tokens > 32 else (2, 4)
        decoders = {f"k={k}": {"num_draft_tokens": k, "schedule": "constant"} for k in sweep}
        decoders["adaptive"] = {"schedule": "adaptive"}
        seconds = dict.fromkeys(["target", *decoders], 0.0)
        stats = {name: [0, 0, 0, 0] for name in decoders}  # accepted, drafted, forwards, tokens
        identical = True
        for ids in prompts:
            start = time.perf_counter()
            with torch.no_grad():
                ref = target.generate(
                    ids,
                    max_new_tokens=s.spec_new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                )
            seconds["target"] += time.perf_counter() - start
            for name, options in decoders.items():
                out = speculative_generate(
                    target, draft, ids, max_new_tokens=s.spec_new_tokens, **options
                )
                seconds[name] += out.elapsed_s
                identical &= torch.equal(out.sequences, ref)
                for i, v in enumerate(
                    (out.accepted, out.drafted, out.target_forward_calls, out.num_new_tokens)
                ):
                    stats[name][i] += v
        rows = [{"decoder": "target.generate", "speedup": "1.00x", "acceptance": "-",
                 "tokens/target forward": "1.00"}]  # fmt: skip
        for name in decoders:
            accepted, drafted, forwards, tokens = stats[name]
            rows.append(
                {
                    "decoder": f"speculative {name}",
                    "speedup": f"{seconds['target'] / seconds[name]:.2f}x",
                    "acceptance": f"{accepted / max(drafted, 1):.0%}",
                    "tokens/target forward": f"{tokens / max(forwards, 1):.2f}",
                }
            )
        print(table(rows, list(rows[0])))
        speedups = {name: seconds["target"] / seconds[name] for name in decoders}
        plot(
            c.run.root / "speculative.png",
            {"constant k": (list(sweep), [speedups[f"k={k}"] for k in sweep])},
            xlabel="draft tokens per step",
            ylabel="speedup over target.generate",
            title="speculative decoding (greedy, CPU)",
        )
        accepted, drafted, forwards, tokens = stats["adaptive"]
        print(
            f"  draft: 1 layer, hidden {s.draft_hidden}, distilled from the target (KL "
            f"{losses[0]:.2f} -> {losses[-1]:.2f}); greedy outputs identical to "
            f"target.generate for every decoder and prompt: {identical}"
        )
        return {
            "speedup": speedups["adaptive"],
            "acceptance": accepted / max(drafted, 1),
            "tokens_per_forward": tokens / max(forwards, 1),
            "identical": identical,
            "speedups": speedups,
            "losses": losses,
        }

    return c.run.step("07_spec", "7. Speculative decoding with a small distilled draft", run)


def plot_losses(run: Run) -> None:
    series = {}
    for key, label in (
        ("01_base", "pre-train (en)"),
        ("03_cpt", "continued (zh)"),
        ("04_sft", "instruction"),
        ("07_spec", "draft (KL to target)"),
    ):
        losses = run.summary.get(key, {}).get("losses")
        if losses:
            series[label] = (list(range(len(losses))), smooth(losses))
    plot(
        run.root / "loss_curves.png",
        series,
        xlabel="step",
        ylabel="loss",
        title="training loss (running mean)",
    )
