"""Steps 1-4 of ``examples/recipe.py`` (build the Chinese model) and what the later steps share.

Each step is a function of the shared :class:`Context` and caches its outputs in its own folder
of the run directory."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from recipe_lib import Run, perplexity, to_blocks, train_lm

from llamazh.templates import get_template
from llamazh.tokenizer import (
    encoding_efficiency,
    export_hf_tokenizer,
    merge_sentencepiece,
    resize_embeddings,
    train_sentencepiece,
)
from llamazh.training import (
    CausalLMCollator,
    merge_adapters,
    prepare_for_training,
    save_adapter,
)

DATA = Path(__file__).resolve().parent.parent / "data"
LLAMA2 = DATA / "tokenizers" / "llama2.model"
EOS = 2
BOOK_D2L, BOOK_CLASSICAL = "《动手学深度学习》", "中国古典诗文"
CONTINUE = "续写下面这段文字。"
WHICH_BOOK = "这段文字出自哪里？"


@dataclass
class Context:
    sizes: Any
    run: Run
    en_train: list[str]
    en_heldout: list[str]
    zh_train: list[str]
    zh_heldout: list[str]
    classical: list[str]

    @property
    def merged_model(self) -> Path:
        return self.run.path("02_vocab") / "merged.model"

    @property
    def tokenizer_dir(self) -> Path:
        return self.run.path("02_vocab") / "tokenizer"


def sp(path: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def new_llama(vocab_size: int, hidden: int, layers: int, heads: int, block: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=block,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ---- 1 -----------------------------------------------------------------------------------
def step_pretrain(c: Context) -> dict:
    s = c.sizes

    def run(d: Path) -> dict:
        llama = sp(LLAMA2)
        train = to_blocks(c.en_train, llama.encode, EOS, s.block)
        held = to_blocks(c.en_heldout, llama.encode, EOS, s.block)[:32]
        torch.manual_seed(0)
        model = new_llama(llama.get_piece_size(), s.hidden, s.layers, s.heads, s.block)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"  model: {s.layers} layers, hidden {s.hidden}, {n_params / 1e6:.1f} M parameters;"
            f" {train.numel():,} English tokens in blocks of {s.block}"
        )
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        losses = train_lm(
            model,
            train,
            steps=s.pretrain_steps,
            batch_size=s.batch,
            optimizer=opt,
            desc="pre-train",
        )
        model.save_pretrained(d / "model")
        ppl = perplexity(model, held)
        print(
            f"  English held-out perplexity: {ppl:.1f} (loss {losses[0]:.2f} -> {losses[-1]:.2f})"
        )
        return {"en_ppl": ppl, "params_m": n_params / 1e6, "losses": losses}

    return c.run.step("01_base", "1. Pre-train a tiny 'original LLaMA' on English", run)


# ---- 2 -----------------------------------------------------------------------------------
def step_vocabulary(c: Context) -> dict:
    s = c.sizes

    def run(d: Path) -> dict:
        text = d / "zh_train.txt"
        text.write_text("\n".join(c.zh_train + c.classical), encoding="utf-8")
        start = time.perf_counter()
        zh = train_sentencepiece(text, d / "zh.model", vocab_size=s.zh_vocab)
        trained = time.perf_counter() - start
        merged = merge_sentencepiece(LLAMA2, zh, scores="rank")
        merged.save(c.merged_model)
        export_hf_tokenizer(merged, c.tokenizer_dir)
        print(f"  trained a {s.zh_vocab}-piece Chinese model in {trained:.1f} s; merged: {merged}")
        report = encoding_efficiency(
            {"llama2": LLAMA2, "merged": c.merged_model},
            {
                "zh held-out": c.zh_heldout,
                "zh classical": c.classical[-200:],
                "en held-out": c.en_heldout,
            },
        )
        print(report.table())
        return {
            "merged_size": merged.final_size,
            "zh_tpc_llama2": report.get("llama2", "zh held-out").tokens_per_char,
            "zh_tpc_merged": report.get("merged", "zh held-out").tokens_per_char,
            "en_tpc_llama2": report.get("llama2", "en held-out").tokens_per_char,
            "en_tpc_merged": report.get("merged", "en held-out").tokens_per_char,
        }

    return c.run.step("02_vocab", "2. Train a Chinese vocabulary and merge it", run)


# ---- 3 -----------------------------------------------------------------------------------
def step_continue_pretraining(c: Context) -> dict:
    s = c.sizes

    def run(d: Path) -> dict:
        model = load(c.run.path("01_base") / "model")
        new_ids = resize_embeddings(model, LLAMA2, c.merged_model, init="subword_mean")
        model.save_pretrained(d / "resized_base")
        merged = sp(c.merged_model)
        zh_train = to_blocks(c.zh_train, merged.encode, EOS, s.block)
        # a little English replay (one block in five) limits forgetting, as mixed corpora do
        en_replay = to_blocks(c.en_train, merged.encode, EOS, s.block)[: len(zh_train) // 4]
        train = torch.cat([zh_train, en_replay])
        print(f"  {len(zh_train)} Chinese + {len(en_replay)} English replay blocks of {s.block}")
        zh_held = to_blocks(c.zh_heldout, merged.encode, EOS, s.block)[:32]
        en_held = to_blocks(c.en_heldout, merged.encode, EOS, s.block)[:32]
        before = perplexity(model, zh_held), perplexity(model, en_held)
        print(
            f"  resized to {model.get_input_embeddings().num_embeddings} rows "
            f"({len(new_ids)} new, sub-word mean init); zh ppl {before[0]:.1f}, "
            f"en ppl {before[1]:.1f}"
        )
        # Only the new input rows train (the old ones keep their English meaning), but the whole
        # lm_head does: with new output rows only, the English-trained softmax keeps favouring
        # English pieces (measured on this recipe: Chinese perplexity 7,849 vs 731 after 100
        # steps). Chinese-LLaMA trains both matrices in full.
        prepared = prepare_for_training(
            model,
            rank=s.lora_rank,
            alpha=2 * s.lora_rank,
            dropout=0.05,
            embeddings="new_rows",
            lm_head="full",
            new_token_ids=new_ids,
        )
        print(f"  trainable parameters:\n{prepared.report()}")
        opt = torch.optim.AdamW(prepared.param_groups(5e-3, embedding_lr=1e-2))
        losses = train_lm(
            model,
            train,
            steps=s.cpt_steps,
            batch_size=s.batch,
            optimizer=opt,
            desc="continue pre-training",
        )
        save_adapter(prepared, d / "adapter")
        after = perplexity(model, zh_held), perplexity(model, en_held)
        print(
            f"  zh ppl {before[0]:.1f} -> {after[0]:.1f}; en ppl {before[1]:.1f} -> "
            f"{after[1]:.1f} (forgetting)"
        )
        return {
            "new_rows": len(new_ids),
            "zh_ppl_before": before[0],
            "zh_ppl_after": after[0],
            "en_ppl_before": before[1],
            "en_ppl_after": after[1],
            "losses": losses,
        }

    return c.run.step("03_cpt", "3. Resize embeddings, continue pre-training on Chinese", run)


# ---- 4 -----------------------------------------------------------------------------------
def sft_records(c: Context, n: int, rng: random.Random) -> list[dict]:
    records = []
    for line in rng.sample(c.zh_train, min(n // 3, len(c.zh_train))):
        if len(line) >= 16:
            cut = min(len(line) // 2, 60)
            records.append(
                {"instruction": CONTINUE, "input": line[:cut], "output": line[cut : cut + 30]}
            )
    pool = [(x, BOOK_D2L) for x in c.zh_train] + [(x, BOOK_CLASSICAL) for x in c.classical[:-40]]
    for line, book in rng.sample(pool, min(n - n // 3, len(pool))):
        records.append({"instruction": WHICH_BOOK, "input": line[:40], "output": book})
    rng.shuffle(records)
    return records


def book_questions(c: Context, n: int) -> list[tuple[str, str]]:
    d2l = [(x[:40], BOOK_D2L) for x in c.zh_heldout[:n]]
    classical = [(x[:40], BOOK_CLASSICAL) for x in c.classical[-n:]]
    return d2l + classical


@torch.no_grad()
def answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    template = get_template("alpaca2")
    prompt = template.render([{"role": "user", "content": question}])
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=template.stop_token_ids(tokenizer),
        pad_token_id=0,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


@torch.no_grad()
def answer_logprob(model, tokenizer, question: str, reply: str) -> float:
    """log p(reply | question) under the alpaca2 template (the reply's tokens and its EOS)."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    ids, labels = get_template("alpaca2").encode(tokenizer, messages)
    ids, labels = torch.tensor([ids]), torch.tensor(labels[1:])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    scored = labels != -100
    return logprobs[scored].gather(-1, labels[scored, None]).sum().item()


def book_accuracy(model, tokenizer, questions: list[tuple[str, str]]) -> float:
    """Multiple choice, as evaluation harnesses score it: the more likely of the two books."""
    books = (BOOK_D2L, BOOK_CLASSICAL)
    hits = 0
    for line, book in questions:
        q = f"{WHICH_BOOK}\n{line}"
        scores = [answer_logprob(model, tokenizer, q, b) for b in books]
        hits += books[scores.index(max(scores))] == book
    return hits / len(questions)


def step_instruction_tuning(c: Context) -> dict:
    from transformers import AutoTokenizer

    s = c.sizes

    def run(d: Path) -> dict:
        merge_adapters(
            c.run.path("03_cpt") / "resized_base",
            [c.run.path("03_cpt") / "adapter"],
            d / "cpt_merged",
            progress=False,
        )
        model = load(d / "cpt_merged")
        tokenizer = AutoTokenizer.from_pretrained(c.tokenizer_dir)
        template = get_template("alpaca2")
        rng = random.Random(0)
        records = sft_records(c, s.sft_records, rng)
        examples = []
        for r in records:
            user = f"{r['instruction']}\n{r['input']}" if r["input"] else r["instruction"]
            ids, labels = template.encode(
                tokenizer,
                [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}],
                max_length=2 * s.block,
                overflow="truncate",
            )
            examples.append({"input_ids": ids, "labels": labels})
        questions = book_questions(c, 20 if s.sft_steps > 20 else 4)
        demos = [
            f"{CONTINUE}\n{c.zh_heldout[0][:30]}",
            f"{WHICH_BOOK}\n{c.zh_heldout[1][:40]}",
            f"{WHICH_BOOK}\n{c.classical[-1][:40]}",
        ]
        before_text = [answer(model, tokenizer, q) for q in demos]
        acc_before = book_accuracy(model, tokenizer, questions)
        prepared = prepare_for_training(
            model, rank=s.lora_rank, alpha=2 * s.lora_rank, embeddings="frozen", lm_head="full"
        )
        opt = torch.optim.AdamW(prepared.param_groups(5e-3))
        collate = CausalLMCollator(pad_token_id=0)
        gen = torch.Generator().manual_seed(0)
        losses = []
        model.train()
        for _step in range(s.sft_steps):
            idx = torch.randint(0, len(examples), (s.batch,), generator=gen).tolist()
            batch = collate([examples[i] for i in idx])
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        model.eval()
        save_adapter(prepared, d / "adapter")
        after_text = [answer(model, tokenizer, q) for q in demos]
        acc_after = book_accuracy(model, tokenizer, questions)
        print(
            f"  {len(examples)} SFT examples ({template.name}); loss {losses[0]:.2f} -> "
            f"{losses[-1]:.2f}"
        )
        for q, before, after in zip(demos, before_text, after_text):
            print(f"  prompt: {q!r}\n    before: {before!r}\n    after:  {after!r}")
        print(
            f"  'which book' accuracy on held-out lines: {acc_before:.0%} -> {acc_after:.0%}"
            " (the more likely of the two books; balanced, so chance is 50%)"
        )
        return {
            "examples": len(examples),
            "accuracy_before": acc_before,
            "accuracy_after": acc_after,
            "before": before_text,
            "after": after_text,
            "losses": losses,
        }

    return c.run.step("04_sft", "4. Instruction-tune with the alpaca2 template", run)
