"""Plumbing for ``examples/recipe.py``: resumable steps, a compute-budgeted training loop,
chat generation, timing, plots (bits per character is ``llamazh.evaluation.bits_per_char``).
Nothing here is Chinese-LLaMA specific."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llamazh.training import CausalLMCollator


@dataclass
class Run:
    """A run directory whose steps cache their results: a second run resumes."""

    root: Path
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def step(self, name: str, title: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn(step_dir)`` unless ``step_dir/done.json`` exists; return its metrics.

        ``done.json`` is written last (atomically), so an interrupted step leaves no
        ``done.json`` and is redone from scratch by the next run.
        """
        step_dir = self.root / name
        done = step_dir / "done.json"
        print(f"\n=== {title} ===", flush=True)
        if done.is_file():
            metrics = json.loads(done.read_text(encoding="utf-8"))
            print(f"(cached in {step_dir}; delete that folder to redo this step)")
            for key, value in metrics.items():
                if isinstance(value, float):
                    print(f"  {key}: {value:.4g}")
                elif isinstance(value, (int, str, bool)):
                    print(f"  {key}: {value}")
        else:
            if step_dir.exists():  # an interrupted earlier attempt: start the step afresh
                shutil.rmtree(step_dir)
            step_dir.mkdir(parents=True)
            start, cpu = time.perf_counter(), time.process_time()
            # each step seeds itself, so a resumed run computes what a fresh one does
            torch.manual_seed(zlib.crc32(name.encode()))
            metrics = fn(step_dir)
            metrics["seconds"] = round(time.perf_counter() - start, 1)
            metrics["cpu_seconds"] = round(time.process_time() - cpu, 1)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(metrics, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, done)
        self.summary[name] = metrics
        return metrics


def to_blocks(
    lines: Sequence[str], encode: Callable[[str], list[int]], sep_id: int, block_size: int
) -> torch.Tensor:
    """Encode lines, put ``sep_id`` before each (a document boundary), concatenate, cut.

    Returns (N, block_size) int64; the ragged tail is dropped.
    """
    stream: list[int] = []
    for line in lines:
        stream.append(sep_id)
        stream.extend(encode(line))
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def to_line_rows(
    lines: Sequence[str], encode: Callable[[str], list[int]], sep_id: int, block_size: int
) -> list[list[int]]:
    """Encode lines, put ``sep_id`` before each, and pack whole lines, in order, into rows of at
    most ``block_size`` tokens, so that every row starts at a document boundary (as the
    bits/char evaluation does) and no line is split across rows.

    A line longer than ``block_size - 1`` tokens keeps its first ``block_size - 1`` tokens (a
    row of its own): the rows see the beginnings of lines, as the evaluation reads them.
    Returns a list of rows (token-id lists, ragged); pad them with ``row_sampler``.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a separator and a token), got {block_size}")
    rows: list[list[int]] = []
    row: list[int] = []
    for line in lines:
        ids = [sep_id, *encode(line)[: block_size - 1]]
        if len(ids) < 2:
            continue  # an empty line: nothing to predict
        if len(row) + len(ids) > block_size:
            rows.append(row)
            row = []
        row += ids
    if row:
        rows.append(row)
    return rows


def row_sampler(
    rows: Sequence[Sequence[int]], batch_size: int, seed: int, pad_id: int
) -> Callable[[int], dict]:
    """Random batches of ragged rows, right-padded with ``pad_id``: ``{"input_ids",
    "attention_mask", "labels"}`` (B, longest row in the batch), labels -100 on padding."""
    gen = torch.Generator().manual_seed(seed)
    collate = CausalLMCollator(pad_token_id=pad_id)

    def next_batch(_step: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(rows), (batch_size,), generator=gen).tolist()
        return collate([rows[i] for i in idx])

    return next_batch


def cut_texts(lines: Sequence[str], total_chars: int, max_chars: int = 400) -> list[str]:
    """The first lines (each cut to ``max_chars``) until ``total_chars`` characters."""
    out, n = [], 0
    for line in lines:
        if n >= total_chars:
            break
        out.append(line[:max_chars])
        n += len(out[-1])
    return out


@dataclass
class FitResult:
    losses: list[float]
    cpu_at_step: list[float]  # CPU seconds of training when each step ended
    evals: list[tuple[float, float]]  # (training CPU seconds, value of evaluate())
    wall_s: float

    @property
    def steps(self) -> int:
        return len(self.losses)


def fit(
    model: torch.nn.Module,
    next_batch: Callable[[int], dict[str, torch.Tensor]],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer,
    budget_cpu_s: float | None,
    max_steps: int | None,
    desc: str,
    warmup: int = 2,
    evaluate: Callable[[], float] | None = None,
    eval_at: Sequence[float] = (),
) -> FitResult:
    """The recipe's training loop, run until ``budget_cpu_s`` seconds of process CPU time (the
    compute this process received, robust to other jobs on a shared machine) or ``max_steps``
    (``None``: no such limit; at least one of the two is needed).

    The learning rate warms up linearly for ``warmup`` steps, then follows a cosine over the
    fraction of the budget used (floor 5%); gradients are clipped at 1. ``evaluate()`` runs at
    the fractions ``eval_at`` of the budget (its own time is not counted).
    """
    if budget_cpu_s is None and max_steps is None:
        raise ValueError("fit needs budget_cpu_s or max_steps (both are None)")
    budget = math.inf if budget_cpu_s is None else budget_cpu_s
    steps_cap = math.inf if max_steps is None else max_steps
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    res = FitResult([], [], [], 0.0)
    pending = sorted(eval_at)
    spent, wall = 0.0, time.perf_counter()

    def maybe_eval(force: bool = False) -> None:
        progress = max(spent / budget, step / steps_cap)
        due = [f for f in pending if force or progress >= f]
        if evaluate is not None and due:  # several fractions reached at once: one evaluation
            del pending[: len(due)]
            res.evals.append((round(spent, 1), evaluate()))
            model.train()

    step = 0
    model.train()
    maybe_eval()
    by_steps = max_steps is not None and budget_cpu_s is None
    bar = tqdm(
        total=max_steps if by_steps else round(budget),
        desc=desc,
        leave=False,
        unit="step" if by_steps else "cpu s",
        mininterval=1.0,
        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]",
    )
    while step < steps_cap and spent < budget:
        tick = time.process_time()
        progress = max(spent / budget, step / steps_cap)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * max(scale, 0.05)
        loss = loss_fn(next_batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        res.losses.append(loss.item())
        took = time.process_time() - tick
        spent += took
        res.cpu_at_step.append(round(spent, 1))
        step += 1
        bar.update(1 if by_steps else min(took, max(bar.total - bar.n, 0)))
        bar.set_postfix(loss=f"{res.losses[-1]:.3f}", step=step)
        maybe_eval()
    bar.close()
    maybe_eval(force=True)  # whatever was not reached (max_steps hit first)
    model.eval()
    res.wall_s = round(time.perf_counter() - wall, 1)
    return res


def block_sampler(blocks: torch.Tensor, batch_size: int, seed: int) -> Callable[[int], dict]:
    """Random batches of causal-LM blocks ``(N, S)``: ``{"input_ids", "labels"}``."""
    gen = torch.Generator().manual_seed(seed)

    def next_batch(_step: int) -> dict[str, torch.Tensor]:
        batch = blocks[torch.randint(0, blocks.shape[0], (batch_size,), generator=gen)]
        return {"input_ids": batch, "labels": batch}

    return next_batch


def lm_loss(model: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    return lambda batch: model(**batch).loss


@torch.no_grad()
def chat(
    model: Any,
    tokenizer: Any,
    template: Any,
    question: str,
    max_new_tokens: int,
    *,
    until_eos: bool = True,
) -> tuple[str, float, int]:
    """Greedy answer to one user message: ``(text, seconds, new tokens)``.

    ``until_eos=False`` generates exactly ``max_new_tokens`` (for speed measurements).
    """
    prompt = template.render([{"role": "user", "content": question}])
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    stop = template.stop_token_ids(tokenizer)
    start = time.perf_counter()
    out = model.generate(
        enc.input_ids,
        attention_mask=enc.attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0 if until_eos else max_new_tokens,
        do_sample=False,
        eos_token_id=stop,
        pad_token_id=stop[0],
    )
    seconds = time.perf_counter() - start
    new = out[0, enc.input_ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), seconds, new.numel()


def smooth(values: Sequence[float], window: int = 5) -> list[float]:
    """Running mean, for loss curves."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(
    path: Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    bars: bool = False,
) -> Path | None:
    """Save a line (or bar) plot as PNG; returns None (and says so) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: skipped {path.name})")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if bars:
        ((labels, values),) = series.values()
        ax.bar(range(len(values)), values)
        ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8)
    else:
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, label=label)
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table (markdown-compatible)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(list(columns)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(row) for row in cells)
    return "\n".join(out)
