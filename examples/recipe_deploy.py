"""Steps 5-7 of ``examples/recipe.py``: long context (shortened protocol), the standalone
merged model, speculative decoding against transformers; and the plots."""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from recipe_adapt import (
    REPEAT_EN,
    REPEAT_ZH,
    SEP,
    TEMPLATE,
    Context,
    answers,
    encoder,
    paired_zh_speed,
)
from recipe_lib import Run, block_sampler, fit, plot, smooth, table, to_blocks

import llamazh
from llamazh.evaluation import perplexity_by_length
from llamazh.rope import DynamicNTKScaling, NoScaling, NTKScaling, YaRNScaling
from llamazh.speculative import PromptLookupDrafter, speculative_generate
from llamazh.templates import get_template
from llamazh.training import load_adapter, merge_adapters


def load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def zh_stream(c: Context, tokenizer: Any) -> torch.Tensor:
    sep = tokenizer.convert_tokens_to_ids(SEP)
    return to_blocks(c.zh_held + c.classical_held, encoder(tokenizer), sep, 1).flatten()


def rope_strategies(original: int, factor: float) -> dict[str, Any]:
    return {
        "none": NoScaling(),
        f"NTK (alpha {factor:g})": NTKScaling(alpha=factor),
        f"dynamic NTK (x{factor:g})": DynamicNTKScaling(factor, original),
        f"YaRN (x{factor:g})": YaRNScaling(factor=factor, original_max_position=original),
    }  # fmt: skip


# ---- 5 -----------------------------------------------------------------------------------
def step_long_context(c: Context) -> dict:
    s = c.sizes

    def run(d: Path) -> dict:
        model = load(c.run.path("04_sft") / "cpt_merged")
        stream = zh_stream(c, c.ext_tokenizer())
        base = s.long_original  # the shortened protocol: the strategies treat this as "1x"
        lengths = [base * k for k in (1, 2, 4)]
        results = {}
        for name, strategy in rope_strategies(base, 4.0).items():
            with llamazh.patch(model, rope=strategy):
                ppl = perplexity_by_length(
                    model, stream, lengths, max_windows=s.long_windows, score_last=base // 2
                )
            results[name] = [ppl[n] for n in lengths]
            print(f"  {name}: " + ", ".join(f"{n}: {ppl[n]:.2f}" for n in lengths), flush=True)
        rows = [{"rope": k, **{f"{n} ({n // base}x)": f"{v:.2f}" for n, v in zip(lengths, vs)}}
                for k, vs in results.items()]  # fmt: skip
        print(
            f"  shortened protocol: the strategies are told the original length is {base} (the "
            f"model was trained at {model.config.max_position_embeddings}); perplexity of the "
            f"last {base // 2} tokens of {s.long_windows} held-out Chinese windows per length"
        )
        print(table(rows, list(rows[0])))
        plot(
            c.run.root / "long_context.png",
            {k: (lengths, v) for k, v in results.items()},
            xlabel="tokens",
            ylabel="perplexity (last tokens)",
            title=f"rotary scalings told 'original = {base}' (real: 8,192)",
        )
        best = min(results, key=lambda k: results[k][-1])
        headline = (f"ppl at {lengths[-1]}: none {results['none'][-1]:.2f}, best {best} "
                    f"{results[best][-1]:.2f}")  # fmt: skip
        return {"lengths": lengths, "perplexity": results, "headline": headline}

    title = "5. Long context: perplexity vs length per rotary scaling (shortened protocol)"
    return c.run.step("05_long", title, run)


# ---- 6 -----------------------------------------------------------------------------------
def gguf_export(model_dir: Path, path: Path, tokenizer: Any, text: str) -> dict:
    """The merged model as a GGUF file for llama.cpp; its tokenizer read back by transformers."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    llamazh.export_gguf(model_dir, path, dtype="f16")
    seconds = time.perf_counter() - start
    back = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    same = back(text).input_ids == tokenizer(text).input_ids
    size = path.stat().st_size / 1e6
    print(f"  wrote {path} ({size:.0f} MB, {seconds:.1f} s); its tokenizer gives the same ids: "
          f"{same} (run: llama-cli -m {path.name})")  # fmt: skip
    return {"path": path.name, "mb": round(size, 1), "s": round(seconds, 1), "ids_match": same}


def step_merge(c: Context) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = c.sizes

    def run(d: Path) -> dict:
        out = d / "model"
        merge_adapters(
            c.run.path("03_cpt") / "resized_base",
            [c.run.path("03_cpt") / "adapter", c.run.path("04_sft") / "adapter"],
            out,
            progress=False,
        )
        stock = AutoModelForCausalLM.from_pretrained(out).eval()
        tokenizer = AutoTokenizer.from_pretrained(out)
        reference = load(c.run.path("04_sft") / "cpt_merged")
        load_adapter(reference, c.run.path("04_sft") / "adapter")
        text = "深度学习是机器学习的一个分支。Deep learning is"
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            diff = (stock(ids).logits - reference(ids).logits).abs().max().item()
        del reference
        said = answers(stock, tokenizer, s.answer_tokens)
        # the base again, timed in turns with the merged model: the two numbers of a ratio
        # come from the same minutes of a shared machine
        paired = paired_zh_speed({"base": c.base(), "merged": (stock, tokenizer)},
                                 s.speed_tokens, rounds=3)  # fmt: skip
        (before, cjk_before), (speed, cjk) = paired["base"], paired["merged"]
        print(
            f"  wrote {out} ({sum(1 for _ in out.iterdir())} files); stock from_pretrained "
            f"vs unmerged adapters: max |logit diff| {diff:.2e}"
        )
        gguf = gguf_export(out, d / "model.f16.gguf", tokenizer, text)
        for q, a in said.items():
            print(f"  {q}\n    -> {a!r}")
        print(f"  Chinese generation: {before:.1f} -> {speed:.1f} characters/s "
              f"({speed / before:.2f}x), CJK ideographs {cjk_before:.1f} -> {cjk:.1f}/s "
              f"({cjk / cjk_before:.2f}x; {s.speed_tokens} tokens a prompt, base and merged "
              f"model in turns, median of 3 rounds)")  # fmt: skip
        return {"max_logit_diff": diff, "answers": said, "zh_chars_per_s": speed,
                "zh_cjk_per_s": cjk, "base_zh_chars_per_s": before,
                "base_zh_cjk_per_s": cjk_before, "gguf": gguf}  # fmt: skip

    return c.run.step("06_merge", "6. Merge into a standalone model, load it stock", run)


# ---- 7 -----------------------------------------------------------------------------------
def make_draft(target: Any, layers: int) -> Any:
    """The target's first ``layers`` decoder layers, final norm, embedding and lm_head (tied
    if the target's are)."""
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    draft = LlamaForCausalLM(config)
    keep = {k: v for k, v in target.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}  # fmt: skip
    draft.load_state_dict(keep, strict=False)
    draft.tie_weights()
    return draft.eval()


def distill_draft(c: Context, target: Any, draft: Any, tokenizer: Any) -> list[float]:
    """Train the draft's layers and norm towards the target's next-token distributions."""
    s = c.sizes
    sep = tokenizer.convert_tokens_to_ids(SEP)
    enc = encoder(tokenizer)
    blocks = torch.cat([
        to_blocks(c.zh_train[-s.draft_lines:], enc, sep, s.draft_block),
        to_blocks(c.en_train[-s.draft_lines // 4:], enc, sep, s.draft_block),
    ])  # fmt: skip
    # the target's embedding stays frozen; an untied lm_head (the merged extension) trains
    draft.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]

    def kl(batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        with torch.no_grad():
            target_logp = torch.log_softmax(target(input_ids=ids).logits.float(), dim=-1)
        logq = torch.log_softmax(draft(input_ids=ids).logits.float(), dim=-1)
        loss = torch.nn.functional.kl_div(logq, target_logp, log_target=True, reduction="batchmean")
        return loss / ids.shape[1]  # batchmean divides by B only: make it per token

    res = fit(draft, block_sampler(blocks, s.batch, seed=1), kl,
              optimizer=torch.optim.AdamW(params, lr=s.draft_lr), budget_cpu_s=s.draft_cpu_s,
              max_steps=s.draft_max_steps, desc="distil the draft")  # fmt: skip
    return res.losses


def quantized(model: Any) -> Any:
    """int8 dynamic quantization of every Linear (a CPU draft is bound by its lm_head)."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:  # a torch without eager quantization: keep fp32
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def spec_prompts(c: Context, tokenizer: Any, n: int, chars: int) -> list[torch.Tensor]:
    template = get_template(TEMPLATE)
    zh = [f"{REPEAT_ZH}\n{x[:chars]}" for x in c.zh_held[1 : 1 + n]]
    en = [f"{REPEAT_EN}\n{' '.join(x.split()[: chars // 3])}" for x in c.en_held[1 : 1 + n]]
    texts = [t for pair in zip(zh, en) for t in pair][:n]
    return [tokenizer(template.render([{"role": "user", "content": t}]), return_tensors="pt",
                      add_special_tokens=False).input_ids for t in texts]  # fmt: skip


def step_speculative(c: Context) -> dict:
    s = c.sizes

    def run(d: Path) -> dict:
        from transformers import AutoTokenizer

        target = load(c.run.path("06_merge") / "model")
        tokenizer = AutoTokenizer.from_pretrained(c.run.path("06_merge") / "model")
        stop = get_template(TEMPLATE).stop_token_ids(tokenizer)
        draft = make_draft(target, s.draft_layers)
        losses = distill_draft(c, target, draft, tokenizer)
        draft.save_pretrained(d / "draft")
        draft_q = quantized(draft)
        print(
            f"  draft: the target's first {s.draft_layers} layers + embedding and lm_head, "
            f"distilled (KL {losses[0]:.3f} -> {losses[-1]:.3f}, {len(losses)} steps), int8 "
            "Linear layers"
        )
        prompts = spec_prompts(c, tokenizer, s.spec_prompts, s.spec_prompt_chars)
        n = s.spec_new_tokens
        common = {"max_new_tokens": n, "do_sample": False, "eos_token_id": stop,
                  "pad_token_id": stop[0]}  # fmt: skip
        spec = {"max_new_tokens": n, "eos_token_id": stop}

        def hf(ids: torch.Tensor, **extra: Any) -> torch.Tensor:
            return target.generate(ids, attention_mask=torch.ones_like(ids), **common, **extra)

        methods = {
            "generate": lambda ids: hf(ids),
            "llamazh draft": lambda ids: speculative_generate(target, draft_q, ids, **spec),
            "transformers assisted": lambda ids: hf(ids, assistant_model=draft_q),
            "llamazh prompt lookup": lambda ids: speculative_generate(
                target, PromptLookupDrafter(max_ngram_size=3), ids, num_draft_tokens=8, **spec),
            "transformers prompt lookup": lambda ids: hf(ids, prompt_lookup_num_tokens=8),
        }  # fmt: skip
        wall = {m: [[] for _ in prompts] for m in methods}
        cpu = {m: [[] for _ in prompts] for m in methods}
        reference, identical, accept = {}, True, {m: [0, 0] for m in methods}
        with torch.inference_mode():
            for m in methods:  # warm-up (first calls pay one-off costs); not timed
                methods[m](prompts[0])
            for r in range(s.spec_rounds):  # interleaved: noise hits every method alike
                order = list(methods)[r % len(methods) :] + list(methods)[: r % len(methods)]
                for p, ids in enumerate(prompts):
                    for m in order:
                        t0, c0 = time.perf_counter(), time.process_time()
                        out = methods[m](ids)
                        wall[m][p].append(time.perf_counter() - t0)
                        cpu[m][p].append(time.process_time() - c0)
                        seq = getattr(out, "sequences", out)
                        if hasattr(out, "accepted"):
                            accept[m][0] += out.accepted
                            accept[m][1] += out.drafted
                        if m == "generate":
                            reference.setdefault(p, seq)
                        else:
                            identical &= torch.equal(seq, reference[p])

        def total(times: dict, m: str) -> float:  # per prompt: the median over rounds
            return sum(sorted(t)[len(t) // 2] for t in times[m])

        new_tokens = sum(reference[p].shape[1] - ids.shape[1] for p, ids in enumerate(prompts))
        rows, speed = [], {}
        for m in methods:
            speed[m] = total(wall, "generate") / total(wall, m)
            a, dr = accept[m]
            rows.append({
                "method": m,
                "s (median, all prompts)": f"{total(wall, m):.2f}",
                "speed-up (wall)": f"{speed[m]:.2f}x",
                "speed-up (CPU time)": f"{total(cpu, 'generate') / total(cpu, m):.2f}x",
                "acceptance": f"{a / dr:.0%}" if dr else "-",
            })  # fmt: skip
        print(table(rows, list(rows[0])))
        checks = {
            "draft >= 2x over generate": speed["llamazh draft"] >= 2.0,
            "draft >= 1.3x over transformers assisted":
                speed["llamazh draft"] / speed["transformers assisted"] >= 1.3,
            "prompt lookup >= 1.5x over transformers'":
                speed["llamazh prompt lookup"] / speed["transformers prompt lookup"] >= 1.5,
        }  # fmt: skip
        print(
            f"  {len(prompts)} 'repeat this paragraph' prompts, {new_tokens} new tokens in all,"
            f" {s.spec_rounds} interleaved rounds; greedy outputs identical: {identical}"
        )
        for k, ok in checks.items():
            print(f"  target {k}: {'met' if ok else 'NOT met'}")
        plot(
            c.run.root / "speculative.png",
            {"speed-up": (list(methods), [speed[m] for m in methods])},
            xlabel="",
            ylabel="speed-up over generate (wall)",
            title="greedy decoding, CPU, 'repeat this paragraph' prompts",
            bars=True,
        )
        return {"speedups": speed, "identical": identical, "targets": checks,
                "new_tokens": new_tokens, "draft_losses": losses,
                "acceptance": {m: a / dr for m, (a, dr) in accept.items() if dr}}  # fmt: skip

    return c.run.step("07_spec", "7. Speculative decoding: llamazh vs transformers", run)


def plot_all(run: Run) -> None:
    """Loss curves and bits per character against training CPU time."""
    cpt = run.summary.get("03_cpt", {})
    series = {}
    for label, losses in (
        ("CPT extended (per token)", cpt.get("ext", {}).get("losses")),
        ("CPT control (per token)", cpt.get("control", {}).get("losses")),
        ("instruction tuning", run.summary.get("04_sft", {}).get("losses")),
        ("draft (KL to target)", run.summary.get("07_spec", {}).get("draft_losses")),
    ):
        if losses:
            series[label] = (list(range(len(losses))), smooth(losses))
    plot(run.root / "loss_curves.png", series, xlabel="step", ylabel="loss",
         title="training loss (running mean)")  # fmt: skip
    curves = {}
    for key, label in (("ext", "extended vocabulary"), ("control", "control (original)")):
        points = cpt.get(key, {}).get("curve")
        if points:
            curves[label] = ([p[0] for p in points], [p[1] for p in points])
    if curves:
        plot(
            run.root / "bpc_vs_time.png",
            curves,
            xlabel="training CPU seconds",
            ylabel="held-out Chinese bits/char",
            title="continued pre-training, same budget",
        )
