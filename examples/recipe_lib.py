"""Plumbing for ``examples/recipe.py``: resumable steps, a plain training loop, perplexity,
plots. Nothing here is Chinese-LLaMA specific; the recipe itself lives in ``recipe.py``."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


@dataclass
class Run:
    """A run directory whose steps cache their results: a second run resumes."""

    root: Path
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def step(self, name: str, title: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn(step_dir)`` unless ``step_dir/done.json`` exists; return its metrics."""
        step_dir = self.root / name
        done = step_dir / "done.json"
        print(f"\n=== {title} ===", flush=True)
        if done.is_file():
            metrics = json.loads(done.read_text(encoding="utf-8"))
            print(f"(cached in {step_dir}; delete that folder to redo this step)")
            for key, value in metrics.items():
                if isinstance(value, float):
                    print(f"  {key}: {value:.4g}")
                elif not isinstance(value, (list, dict)):
                    print(f"  {key}: {value}")
        else:
            if step_dir.exists():  # an interrupted earlier attempt: start the step afresh
                shutil.rmtree(step_dir)
            step_dir.mkdir(parents=True)
            start = time.perf_counter()
            # each step seeds itself, so a resumed run computes what a fresh one does
            torch.manual_seed(zlib.crc32(name.encode()))
            metrics = fn(step_dir)
            metrics["seconds"] = round(time.perf_counter() - start, 1)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(metrics, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, done)
        self.summary[name] = metrics
        return metrics


def cjk_fraction(text: str) -> float:
    """Share of the characters of ``text`` that are CJK ideographs."""
    return sum("\u4e00" <= ch <= "\u9fff" for ch in text) / max(len(text), 1)


def read_lines(path: Path, limit_chars: int, *, min_cjk: float = 0.0) -> list[str]:
    """Non-empty lines of ``path`` (with at least ``min_cjk`` CJK characters) until
    ``limit_chars`` characters are read."""
    lines, total = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or cjk_fraction(line) < min_cjk:
                continue
            lines.append(line)
            total += len(line)
            if total >= limit_chars:
                break
    return lines


def to_blocks(
    lines: Iterable[str], encode: Callable[[str], list[int]], eos_id: int, block_size: int
) -> torch.Tensor:
    """Encode lines, append EOS to each (the v2 recipe), concatenate, cut into blocks.

    Returns (N, block_size) int64; the ragged tail is dropped.
    """
    stream: list[int] = []
    for line in lines:
        stream.extend(encode(line))
        stream.append(eos_id)
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def fit(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    desc: str,
    seed: int = 0,
    warmup: int = 1,
) -> list[float]:
    """The training loop of the recipe: random batches of (N, S) ``blocks``, ``loss_fn(batch)``,
    linear warm-up then cosine decay (floor 5%), gradients clipped at 1; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0)
    for step in bar:
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * max(scale, 0.05)
        batch = blocks[torch.randint(0, blocks.shape[0], (batch_size,), generator=gen)]  # (B, S)
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def train_lm(model: torch.nn.Module, blocks: torch.Tensor, **options: Any) -> list[float]:
    """Causal-LM training of ``model`` on (N, S) ``blocks`` (options as :func:`fit`)."""
    options.setdefault("warmup", 10)
    return fit(model, blocks, lambda batch: model(input_ids=batch, labels=batch).loss, **options)


def distill(
    student: torch.nn.Module, teacher: torch.nn.Module, blocks: torch.Tensor, **options: Any
) -> list[float]:
    """Train ``student`` towards ``teacher``'s next-token distributions (KL(teacher || student)
    per token) on (N, S) ``blocks``, as draft models are made (options as :func:`fit`)."""
    teacher.eval()

    def kl(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=batch).logits.float(), dim=-1)
        logq = torch.log_softmax(student(input_ids=batch).logits.float(), dim=-1)
        loss = torch.nn.functional.kl_div(logq, target, log_target=True, reduction="batchmean")
        return loss / batch.shape[1]  # batchmean divides by B only: make it per token

    return fit(student, blocks, kl, **options)


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Token-level perplexity of ``model`` on (N, S) blocks."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size]
        n_tokens = batch.shape[0] * (batch.shape[1] - 1)
        total += model(input_ids=batch, labels=batch).loss.item() * n_tokens
        count += n_tokens
    return math.exp(total / max(count, 1))


def smooth(values: Sequence[float], window: int = 10) -> list[float]:
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
) -> Path | None:
    """Save a line plot as PNG; returns None (and says so) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: skipped {path.name})")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
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
