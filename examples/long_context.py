"""Long context on the real model: perplexity at 1x and 2x of SmolLM2's 8,192 positions with
no scaling, NTK, dynamic NTK and YaRN (no training at any length).

    python examples/long_context.py                      # the base model, English held-out text
    python examples/long_context.py --model runs/recipe/06_merge/model --text zh

Windows of every length end at the same tokens and only the last ``--score-last`` predictions
are scored, so the lengths are compared on exactly the same tokens; only the context differs.
A forward over 8,192 tokens took 22-52 s on 2 quiet CPU cores, 16,384 tokens 72-129 s: the
default protocol (one window, four strategies, seven forwards) took about 8 minutes. This is the
separate command of step 5 of ``examples/recipe.py``, which runs a shortened protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see examples/recipe.py

import torch

import llamazh
from llamazh.rope import DynamicNTKScaling, NoScaling, NTKScaling, YaRNScaling

DATA = Path(__file__).resolve().parent.parent / "data" / "corpus"


@torch.no_grad()
def last_token_perplexity(
    model: torch.nn.Module, stream: torch.Tensor, length: int, longest: int, windows: int,
    score_last: int,
) -> float:  # fmt: skip
    """exp(mean NLL) of the last ``score_last`` tokens of ``windows`` windows of ``length``
    tokens ending at multiples of ``longest`` in the ``(N,)`` stream; only the logits scored
    are computed (``logits_to_keep``), so 16k-token windows fit in memory."""
    total, count = 0.0, 0
    for w in range(windows):
        end = (w + 1) * longest
        ids = stream[end - length : end].unsqueeze(0)  # (1, L)
        logits = model(input_ids=ids, logits_to_keep=score_last + 1).logits[0, :-1].float()
        targets = ids[0, -score_last:]
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += score_last
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: SmolLM2 base)")
    parser.add_argument("--text", choices=("en", "zh"), default="en")
    parser.add_argument("--factor", type=float, default=2.0, help="scaling factor (2 = 16k)")
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--score-last", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("runs/long_context.json"))
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from llamazh.pretrained import load_smollm2

        model, tokenizer = load_smollm2()
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    model.eval()
    original = model.config.max_position_embeddings
    lengths = [original, int(original * args.factor)]
    files = ["en_d2l.txt"] if args.text == "en" else ["zh_d2l.txt", "zh_classical.txt"]
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for name in files:
        for line in (DATA / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                ids += [sep, *tokenizer(line, add_special_tokens=False).input_ids]
            if len(ids) > lengths[-1] * args.windows:
                break
    stream = torch.tensor(ids[: lengths[-1] * args.windows])
    if stream.numel() < lengths[-1] * args.windows:
        raise SystemExit(f"the {args.text} text has only {stream.numel()} tokens")
    f = args.factor
    strategies = {  # in this order so that a run cut short has the most telling rows
        "none": NoScaling(),
        f"YaRN (x{f:g})": YaRNScaling(factor=f, original_max_position=original),
        f"dynamic NTK (x{f:g})": DynamicNTKScaling(factor=f, original_max_position=original),
        f"NTK (alpha {f:g})": NTKScaling(alpha=f),
    }
    print(
        f"{model.config.num_hidden_layers} layers, trained at {original} positions; "
        f"{args.windows} window(s) of {args.text} text, last {args.score_last} tokens scored"
    )
    results: dict[str, dict[int, float]] = {}
    for name, strategy in strategies.items():
        results[name] = {}
        for n in lengths:
            if strategy.is_dynamic and n <= original:  # dynamic NTK is plain RoPE up to 1x
                results[name][n] = results["none"][n]
                continue
            start = time.perf_counter()
            with llamazh.patch(model, rope=strategy):
                ppl = last_token_perplexity(model, stream, n, lengths[-1], args.windows,
                                            args.score_last)  # fmt: skip
            results[name][n] = ppl
            print(f"  {name} at {n}: perplexity {ppl:.2f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    print(f"\n| rope | {lengths[0]} (1x) | {lengths[1]} ({f:g}x) |\n|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row[lengths[0]]:.2f} | {row[lengths[1]]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
