"""Steps 1-4 of ``examples/recipe.py``: measure SmolLM2, extend its vocabulary, continue
pre-training (and the same-compute control), instruction-tune in ChatML.

Each step is a function of the shared :class:`Context` and caches its outputs in its own folder
of the run directory."""

from __future__ import annotations

import copy
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from recipe_lib import (
    Run,
    block_sampler,
    chat,
    cut_texts,
    fit,
    lm_loss,
    row_sampler,
    table,
    to_blocks,
    to_line_rows,
)

from llamazh.evaluation import bits_per_char
from llamazh.pretrained import load_smollm2, smollm2_dir
from llamazh.templates import get_template
from llamazh.tokenizer import cjk_share, extend_bpe, resize_embeddings
from llamazh.tokenizer.resize import DEFAULT_HEAD_INIT, DEFAULT_INIT
from llamazh.training import (
    CausalLMCollator,
    align_embeddings,
    merge_adapters,
    prepare_for_training,
    save_adapter,
    share_output_rows,
)

# SmolLM2-Instruct's own format: ChatML with its default system prompt
TEMPLATE = "chatml-smollm2"
SEP = "<|endoftext|>"  # SmolLM2's document separator, put before every training/eval text
EN_PROMPTS = (
    "What is the capital of France?",
    "Give me one tip for learning a new language.",
)
ZH_PROMPTS = (
    "中国的首都是哪里？",
    "请用一句话解释什么是机器学习。",
)
CONTINUE_ZH, REPEAT_ZH = "续写下面这段文字。", "把下面这段话原样重复一遍。"
WHICH_BOOK = "这段文字出自哪里？"
CONTINUE_EN, REPEAT_EN = "Continue the following text.", "Repeat the following paragraph."
BOOK_D2L, BOOK_CLASSICAL = "《动手学深度学习》", "中国古典诗文"


@dataclass
class Context:
    sizes: Any
    run: Run
    zh_train: list[str]  # Chinese training lines (zh_d2l, then zh_classical)
    zh_held: list[str]  # held-out CJK-heavy zh_d2l lines
    classical_held: list[str]
    en_train: list[str]
    en_held: list[str]
    tokenizer_override: Path | None = None  # --tokenizer: an extended tokenizer to use

    @property
    def tokenizer_dir(self) -> Path:
        return self.tokenizer_override or self.run.path("02_vocab") / "tokenizer"

    def base(self) -> tuple[Any, Any]:
        model, tokenizer = load_smollm2()
        return model.eval(), tokenizer

    def base_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(smollm2_dir())

    def ext_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def eval_sets(self) -> dict[str, list[str]]:
        s = self.sizes
        return {
            "zh": cut_texts(self.zh_held, s.eval_chars),
            "en": cut_texts(self.en_held, s.eval_chars),
        }

    def curve_set(self) -> list[str]:
        return cut_texts(self.zh_held[::-1], self.sizes.curve_chars)


def encoder(tokenizer: Any):
    return lambda text: tokenizer(text, add_special_tokens=False).input_ids


def bpc_all(model: Any, tokenizer: Any, sets: dict[str, list[str]]) -> dict[str, float]:
    return {k: bits_per_char(model, tokenizer, v, boundary=SEP) for k, v in sets.items()}


def answers(model: Any, tokenizer: Any, n_tokens: int) -> dict[str, str]:
    template = get_template(TEMPLATE)
    return {q: chat(model, tokenizer, template, q, n_tokens)[0] for q in EN_PROMPTS + ZH_PROMPTS}


def zh_chars_per_second(model: Any, tokenizer: Any, n_tokens: int) -> tuple[float, float]:
    """Greedy Chinese generation (exactly ``n_tokens`` a prompt): decoded characters per
    second, and CJK ideographs per second (broken bytes decode to U+FFFD, which is no text)."""
    return paired_zh_speed({"model": (model, tokenizer)}, n_tokens, rounds=1)["model"]


def paired_zh_speed(models: dict[str, tuple[Any, Any]], n_tokens: int,
                    rounds: int = 3) -> dict[str, tuple[float, float]]:  # fmt: skip
    """:func:`zh_chars_per_second` for several ``name -> (model, tokenizer)`` at once, taking
    turns prompt by prompt for ``rounds`` rounds, so that a busy machine slows all of them
    alike: ``name -> (characters/s, CJK ideographs/s)`` from each model's median time.
    Greedy output is the same every round; only the clock differs."""
    template = get_template(TEMPLATE)
    times: dict[str, list[float]] = {name: [] for name in models}
    said: dict[str, list[str]] = {name: [] for name in models}  # the first round's answers
    for r in range(rounds):
        spent = dict.fromkeys(models, 0.0)
        for q in ZH_PROMPTS:
            for name, (model, tokenizer) in models.items():
                text, seconds, _ = chat(model, tokenizer, template, q, n_tokens, until_eos=False)
                spent[name] += seconds
                if r == 0:
                    said[name].append(text)
        for name in models:
            times[name].append(spent[name])
    out = {}
    for name in models:
        seconds = statistics.median(times[name])
        chars = sum(len(t) for t in said[name])
        cjk = sum(round(cjk_share(t) * len(t)) for t in said[name])
        out[name] = (chars / seconds, cjk / seconds)
    return out


def check_extends(base: Any, extended: Any, model: Any) -> None:
    """Refuse an extended tokenizer that does not extend ``model``'s own."""
    rows = model.get_input_embeddings().num_embeddings
    if len(base) != rows:
        raise ValueError(f"the base tokenizer has {len(base)} tokens, the model {rows} rows")
    old, new = base.get_vocab(), extended.get_vocab()
    moved = [t for t, i in old.items() if new.get(t) != i]
    if moved or len(new) <= len(old):
        raise ValueError(
            f"the tokenizer in {getattr(extended, 'name_or_path', '?')!r} does not extend the "
            f"model's own ({len(old)} tokens): {len(moved)} of its tokens are missing or have "
            f"other ids (e.g. {moved[:3]!r}), and it has {len(new)} tokens; an extended "
            "tokenizer must keep every base token at its id and add new ones after them"
        )


# ---- 1 -----------------------------------------------------------------------------------
def step_base(c: Context) -> dict:
    s = c.sizes

    def run(d: Path) -> dict:
        model, tokenizer = c.base()
        n = sum(p.numel() for p in model.parameters())
        print(f"  SmolLM2-135M-Instruct: {model.config.num_hidden_layers} layers, {n / 1e6:.1f} M "
              f"parameters, {len(tokenizer)} tokens")  # fmt: skip
        bpc = bpc_all(model, tokenizer, c.eval_sets())
        print(f"  held-out bits per character: zh {bpc['zh']:.3f}, en {bpc['en']:.3f}")
        said = answers(model, tokenizer, s.answer_tokens)
        for q, a in said.items():
            print(f"  {q}\n    -> {a!r}")
        speed, cjk = zh_chars_per_second(model, tokenizer, s.speed_tokens)
        print(f"  Chinese generation: {speed:.1f} characters/s, of which {cjk:.1f} CJK "
              f"({s.speed_tokens} tokens a prompt)")  # fmt: skip
        return {"bpc_zh": bpc["zh"], "bpc_en": bpc["en"], "answers": said,
                "zh_chars_per_s": speed, "zh_cjk_per_s": cjk}  # fmt: skip

    return c.run.step("01_base", "1. The base model: bits per character and answers", run)


# ---- 2 -----------------------------------------------------------------------------------
def tokens_per_char(tokenizer: Any, lines: list[str]) -> float:
    enc = encoder(tokenizer)
    return sum(len(enc(x)) for x in lines) / sum(len(x) for x in lines)


def step_vocabulary(c: Context) -> dict:
    s = c.sizes

    def run(d: Path) -> dict:
        base = c.base_tokenizer()
        if c.tokenizer_override is not None:
            print(f"  using the extended tokenizer in {c.tokenizer_override} (--tokenizer)")
        else:
            lines = c.zh_train[:: s.vocab_line_stride]
            ext = extend_bpe(base, lines, new_tokens=s.new_tokens)
            ext.save(d / "tokenizer")
            print(f"  {ext}, learned on {len(lines):,} lines")
            sample = ext.new_token_text()[:: max(1, s.new_tokens // 12)]
            print("  some new tokens: " + " ".join(sample))
        extended = c.ext_tokenizer()
        sets = {
            "zh_d2l held-out": c.zh_held,
            "zh_classical held-out": c.classical_held[: s.efficiency_lines],
            "en held-out": c.en_held[: s.efficiency_lines],
        }
        rows, out = [], {"vocab_size": len(extended)}
        for name, lines in sets.items():
            before, after = tokens_per_char(base, lines), tokens_per_char(extended, lines)
            rows.append({"text": name, "SmolLM2": f"{before:.3f}", "extended": f"{after:.3f}",
                         "fewer tokens": f"{before / after:.2f}x"})  # fmt: skip
            key = name.split()[0]
            out[f"tpc_{key}_base"], out[f"tpc_{key}_ext"] = before, after
        print("  tokens per character:")
        print(table(rows, list(rows[0])))
        return out

    return c.run.step("02_vocab", f"2. Extend the vocabulary (+{s.new_tokens:,} tokens)", run)


# ---- 3 -----------------------------------------------------------------------------------
def cpt_arm(c: Context, model: Any, tokenizer: Any, prepared: Any, lrs: tuple[float, float],
            desc: str, *, spent_cpu_s: float = 0.0, curve: list | None = None) -> dict:  # fmt: skip
    """Train one arm (extended vocabulary or control) for what is left of the CPT budget after
    ``spent_cpu_s`` (the extended arm's alignment); bits/char curves in total CPU seconds,
    continuing ``curve``."""
    s = c.sizes
    sep = tokenizer.convert_tokens_to_ids(SEP)
    enc = encoder(tokenizer)
    if s.cpt_samples == "lines":
        zh = to_line_rows(c.zh_train[: s.cpt_lines], enc, sep, s.block)
        en = to_line_rows(c.en_train[: s.cpt_lines // 4], enc, sep, s.block)
        en = en[: max(1, len(zh) // 4)]  # one English replay row in five limits forgetting
        sampler = row_sampler(zh + en, s.batch, seed=0, pad_id=sep)
    else:
        zh = to_blocks(c.zh_train[: s.cpt_lines], enc, sep, s.block)
        en = to_blocks(c.en_train[: s.cpt_lines // 4], enc, sep, s.block)[: max(1, len(zh) // 4)]
        sampler = block_sampler(torch.cat([zh, en]), s.batch, seed=0)
    seen = [0]  # tokens trained on (padding excluded)

    def next_batch(step: int) -> dict:
        batch = sampler(step)
        seen[0] += int((batch["labels"] != -100).sum())
        return batch

    held = c.curve_set()
    # lm_head rows at a tenth of the input rows' rate: every new output row gets a gradient
    # from the softmax at every position, and Adam turns those small, consistent gradients
    # into full-size steps that sink the logits of all new tokens (docs/tokenizer.md)
    named = prepared.named_trainable()
    groups = [{"params": [p for _, p in named[k]], "lr": lr, "weight_decay": 0.0}
              for k, lr in (("lora", lrs[0]), ("embeddings", lrs[1]), ("lm_head", lrs[1] / 10))
              if named.get(k)]  # fmt: skip
    optimizer = torch.optim.AdamW(groups)
    budget = None if s.cpt_cpu_s is None else s.cpt_cpu_s - spent_cpu_s
    res = fit(
        model,
        next_batch,
        lm_loss(model),
        optimizer=optimizer,
        budget_cpu_s=budget,
        max_steps=s.cpt_max_steps,
        desc=desc,
        evaluate=lambda: bits_per_char(model, tokenizer, held, boundary=SEP),
        eval_at=(0.0, 1 / 3, 2 / 3, 1.0),
    )
    bpc = bpc_all(model, tokenizer, c.eval_sets())
    tokens = seen[0]
    print(
        f"  {desc}: {res.steps} steps x {s.batch} x <= {s.block} tokens ({tokens:,} tokens, about "
        f"{tokens / tokens_per_char(tokenizer, held):,.0f} characters) in "
        f"{res.cpu_at_step[-1]:.0f} CPU s ({res.wall_s:.0f} s wall); loss {res.losses[0]:.2f} "
        f"-> {res.losses[-1]:.2f}; "
        f"held-out bits/char zh {bpc['zh']:.3f}, en {bpc['en']:.3f}"
    )
    return {
        "bpc_zh": bpc["zh"],
        "bpc_en": bpc["en"],
        "steps": res.steps,
        "tokens": tokens,
        "train_cpu_s": res.cpu_at_step[-1] + spent_cpu_s,
        "train_wall_s": res.wall_s,
        "losses": res.losses,
        "curve": (curve or []) + [(round(x + spent_cpu_s, 1), v) for x, v in res.evals],
        "blocks": [len(zh), len(en)],
    }


def step_continue_pretraining(c: Context) -> dict:
    s = c.sizes

    def run(d: Path) -> dict:
        model, base = c.base()
        extended = c.ext_tokenizer()
        check_extends(base, extended, model)
        original = copy.deepcopy(model)  # the teacher of the alignment, read-only
        # the embedding gets an lm_head of its own: an input row and an output row of a new
        # token want different things (llamazh.tokenizer.row_init)
        new_ids = resize_embeddings(model, base, extended, untie=True)
        resized = bpc_all(model, extended, c.eval_sets())
        print(
            f"  resized to {len(extended):,} rows ({len(new_ids):,} new; input rows "
            f"{DEFAULT_INIT}, lm_head rows {DEFAULT_HEAD_INIT}, untied); bits/char before "
            f"training: zh {resized['zh']:.3f}, en {resized['en']:.3f}"
        )
        # lm_head rows from counts (no gradient): the first piece's row plus the token's log
        # share of that piece; old pieces that begin new tokens lowered by their own share.
        # Its CPU seconds count towards this arm's budget, like the alignment's
        align_texts = c.zh_train[s.cpt_lines : s.cpt_lines + s.align_lines]
        cpu = time.process_time()
        share = share_output_rows(model, base, extended, align_texts)
        share_cpu_s = time.process_time() - cpu
        shared = bpc_all(model, extended, c.eval_sets())
        print(
            f"  output rows from counts ({share.seen_new:,} new tokens seen, "
            f"{share.lowered_old_rows} old rows lowered, {share_cpu_s:.1f} CPU s): zh "
            f"{shared['zh']:.3f}, en {shared['en']:.3f} bits/char"
        )
        # the adapter holds the new rows only: the lowered old lm_head rows live in this base
        model.save_pretrained(d / "resized_base")
        extended.save_pretrained(d / "resized_base")
        # alignment: the new input rows alone learn to reproduce the base on Chinese text,
        # the body frozen (its CPU seconds count towards this arm's budget)
        report = align_embeddings(
            model, original, base, extended, align_texts, max_cpu_s=s.align_cpu_s,
            max_steps=s.align_max_steps, eval_texts=c.curve_set(), boundary=SEP,
            output_share=False, output_lr=0.0,
        )  # fmt: skip
        del original
        aligned = bpc_all(model, extended, c.eval_sets())
        print(f"  {report}".replace("\n", "\n  "))
        print(f"  after alignment: zh {aligned['zh']:.3f}, en {aligned['en']:.3f} bits/char")
        # LoRA on every projection plus the new rows of the embedding and of the lm_head
        prepared = prepare_for_training(
            model, rank=s.lora_rank, alpha=2 * s.lora_rank, dropout=0.05,
            embeddings="new_rows", lm_head="new_rows", new_token_ids=new_ids,
        )  # fmt: skip
        print(f"  trainable parameters:\n{prepared.report()}")
        ext = cpt_arm(c, model, extended, prepared, (s.lora_lr, s.rows_lr), "extended vocabulary",
                      spent_cpu_s=share_cpu_s + report.cpu_s,
                      curve=[(x + share_cpu_s, v) for x, v in report.curve[:-1]])  # fmt: skip
        save_adapter(prepared, d / "adapter")
        del model, prepared

        # the control: the same budget, LoRA alone on the original tokenizer
        model, base = c.base()
        prepared = prepare_for_training(
            model, rank=s.lora_rank, alpha=2 * s.lora_rank, dropout=0.05,
            embeddings="frozen", lm_head="frozen",
        )  # fmt: skip
        control = cpt_arm(c, model, base, prepared, (s.lora_lr, s.rows_lr), "control (original)")
        save_adapter(prepared, d / "adapter_control")
        base_bpc = c.run.summary["01_base"]
        results = (
            ("SmolLM2 (base)", base_bpc["bpc_zh"], base_bpc["bpc_en"], 0),
            ("extended, resized (no training)", resized["zh"], resized["en"], 0),
            (f"+ output rows from counts ({share_cpu_s:.0f} CPU s)", shared["zh"], shared["en"],
             0),
            (f"+ input rows aligned ({report.cpu_s:.0f} CPU s)", aligned["zh"], aligned["en"],
             0),
            ("extended + LoRA + new rows", ext["bpc_zh"], ext["bpc_en"], ext["tokens"]),
            ("control: LoRA, original tokenizer", control["bpc_zh"], control["bpc_en"],
             control["tokens"]),
        )  # fmt: skip
        rows = [{"model": m, "zh bits/char": f"{zh:.3f}", "en bits/char": f"{en:.3f}",
                 "tokens trained": f"{n:,}"} for m, zh, en, n in results]  # fmt: skip
        print(table(rows, list(rows[0])))
        wins = ext["bpc_zh"] < control["bpc_zh"]
        print(
            f"  at {ext['train_cpu_s']:.0f} / {control['train_cpu_s']:.0f} training CPU s, the "
            "extended vocabulary "
            f"{'wins' if wins else 'does NOT win'} on held-out Chinese: {ext['bpc_zh']:.3f} vs "
            f"{control['bpc_zh']:.3f} bits/char (English {ext['bpc_en']:.3f} vs "
            f"{control['bpc_en']:.3f})"
        )
        return {"new_rows": len(new_ids), "resized": resized, "shared": shared,
                "share_cpu_s": share_cpu_s, "aligned": aligned, "align_cpu_s": report.cpu_s,
                "align_curve": report.curve, "ext": ext, "control": control,
                "extended_wins_zh": wins}  # fmt: skip

    return c.run.step("03_cpt", "3. Continued pre-training, and the same-compute control", run)


# ---- 4 -----------------------------------------------------------------------------------
def sft_records(zh: list[str], classical: list[str], en: list[str], n: int, seed: int) -> list:
    """Chinese instructions from the corpora (continue, repeat, which book) + English replay."""
    rng = random.Random(seed)
    out = []
    for line in rng.sample(zh, min(n // 4, len(zh))):
        if len(line) >= 24:
            cut = min(len(line) // 2, 60)
            out.append((f"{CONTINUE_ZH}\n{line[:cut]}", line[cut : cut + 40]))
    for line in rng.sample(zh, min(n // 6, len(zh))):
        out.append((f"{REPEAT_ZH}\n{line[:60]}", line[:60]))
    pool = [(x, BOOK_D2L) for x in zh] + [(x, BOOK_CLASSICAL) for x in classical]
    for line, book in rng.sample(pool, min(n // 4, len(pool))):
        out.append((f"{WHICH_BOOK}\n{line[:40]}", book))
    for line in rng.sample(en, min(n // 3, len(en))):  # English replay
        if len(line) >= 80:
            words = line.split()
            cut = len(words) // 2
            if rng.random() < 0.5:
                out.append((f"{CONTINUE_EN}\n{' '.join(words[:cut][:40])}",
                            " ".join(words[cut:][:25])))  # fmt: skip
            else:
                out.append((f"{REPEAT_EN}\n{' '.join(words[:30])}", " ".join(words[:30])))
    rng.shuffle(out)
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in out]


@torch.no_grad()
def answer_bpc(model: Any, examples: list[dict], chars: int) -> float:
    """Bits per character of the answers (labelled tokens) of encoded chat examples."""
    import math

    total = 0.0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum"
        ).item()
    return total / math.log(2) / chars


def step_instruction_tuning(c: Context) -> dict:
    s = c.sizes

    def run(d: Path) -> dict:
        from transformers import AutoModelForCausalLM

        merge_adapters(
            c.run.path("03_cpt") / "resized_base",
            [c.run.path("03_cpt") / "adapter"],
            d / "cpt_merged",
            progress=False,
        )
        model = AutoModelForCausalLM.from_pretrained(d / "cpt_merged", dtype=torch.float32).eval()
        tokenizer = c.ext_tokenizer()
        template = get_template(TEMPLATE)

        def encode(conversations: list) -> list[dict]:
            out = []
            for conv in conversations:
                ids, labels = template.encode(tokenizer, conv, max_length=s.sft_len,
                                              overflow="truncate")  # fmt: skip
                out.append({"input_ids": ids, "labels": labels})
            return out

        train = encode(sft_records(c.zh_train, c.zh_train[-3000:], c.en_train, s.sft_records, 0))
        held_conv = sft_records(c.zh_held, c.classical_held, c.en_held, s.sft_held, 1)
        held = encode(held_conv)
        held_chars = sum(len(conv[1]["content"]) for conv in held_conv)
        before = answer_bpc(model, held, held_chars)
        prepared = prepare_for_training(
            model, rank=s.lora_rank, alpha=2 * s.lora_rank, dropout=0.05,
            embeddings="frozen", lm_head="frozen",
        )  # fmt: skip
        collate = CausalLMCollator(pad_token_id=tokenizer.convert_tokens_to_ids(SEP))
        gen = torch.Generator().manual_seed(0)

        def next_batch(_step: int) -> dict:
            idx = torch.randint(0, len(train), (s.batch,), generator=gen).tolist()
            return collate([train[i] for i in idx])

        res = fit(
            model,
            next_batch,
            lm_loss(model),
            optimizer=torch.optim.AdamW(prepared.param_groups(s.sft_lr)),
            budget_cpu_s=s.sft_cpu_s,
            max_steps=s.sft_max_steps,
            desc="instruction tuning",
        )
        save_adapter(prepared, d / "adapter")
        after = answer_bpc(model, held, held_chars)
        said = answers(model, tokenizer, s.answer_tokens)
        bpc_en = bpc_all(model, tokenizer, {"en": c.eval_sets()["en"]})["en"]
        print(
            f"  {len(train)} ChatML examples ({res.steps} steps, {res.cpu_at_step[-1]:.0f} CPU s);"
            f" loss {res.losses[0]:.2f} -> {res.losses[-1]:.2f}; held-out answers "
            f"({len(held)} examples): {before:.3f} -> {after:.3f} bits/char; English text "
            f"{bpc_en:.3f} bits/char"
        )
        base_said = c.run.summary["01_base"]["answers"]
        for q, a in said.items():
            print(f"  {q}\n    base:  {base_said.get(q, '')!r}\n    after: {a!r}")
        return {"examples": len(train), "held_bpc_before": before, "held_bpc_after": after,
                "bpc_en": bpc_en, "answers": said, "steps": res.steps,
                "train_cpu_s": res.cpu_at_step[-1], "losses": res.losses}  # fmt: skip

    return c.run.step("04_sft", "4. Instruction tuning in ChatML", run)
