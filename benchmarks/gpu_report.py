"""What ``gpu_suite.py`` writes: ``results.csv``, ``table.md`` and the short table it prints last
(part status and the issue's targets, each measured against the others in the same run)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from _timing import git_sha

META_COLUMNS = ("device", "torch", "triton", "transformers", "sha")
CEILING = {"GB/s": "copy_gbs", "TFLOP/s": "matmul_tflops"}


class Report:
    """Collects the child's events; renders and writes the outputs."""

    def __init__(self, steps, *, budget_s: float, plan_md: str):
        self.steps, self.budget_s, self.plan_md = steps, budget_s, plan_md
        self.status: dict[str, str] = {p.name: "not run" for p, _ in steps}
        self.used: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self.notes: dict[str, list[str]] = defaultdict(list)
        self.rows: list[dict] = []
        self.meta: dict = {"sha": git_sha()}
        self.total_s: float | None = None
        self.begun = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def handle(self, ev: dict) -> None:
        kind, part = ev["event"], ev.get("part")
        if kind == "meta":
            self.meta.update(ev["meta"])
        elif kind == "start":
            self.started[part] = ev["t"]
            self.status[part] = "running"
        elif kind == "row":
            row = ev["row"]
            key = CEILING.get(row["unit"])
            ceiling = self.meta.get(key) if key and row["part"] != "env" else None
            value = row["value"]
            if ceiling and isinstance(value, float) and math.isfinite(value):
                row["of_ceiling"] = round(value / ceiling, 3)
            self.rows.append(row)
        elif kind == "note":
            self.notes[part].append(ev["text"])
        elif kind == "end":
            self.status[part] = ev["status"]
            self.used[part] = ev["used_s"]

    # ---- outputs ------------------------------------------------------------------------

    def write(self, out: Path) -> None:
        atomic_write_text(out / "results.csv", self.csv())
        atomic_write_text(out / "table.md", self.markdown())

    def csv(self) -> str:
        fields = list(META_COLUMNS)
        for row in self.rows:
            fields += [k for k in row if k not in fields]
        for k in ("part", "case", "provider", "metric", "value", "unit", "of_ceiling", "note"):
            if k not in fields:
                fields.append(k)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, restval="")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({**{k: self.meta.get(k, "") for k in META_COLUMNS}, **row})
        return buf.getvalue()

    def header(self) -> str:
        m = self.meta
        line = (
            f"{m.get('device', '?')}; torch {m.get('torch', '?')}, triton "
            f"{m.get('triton', '?')}, transformers {m.get('transformers', '?')}; llamazh "
            f"{m.get('sha', '?')}; {self.begun}"
        )
        if "copy_gbs" in m:
            line += (
                f"\nceilings measured here: device-to-device copy {m['copy_gbs']:.0f} GB/s, "
                f"{m.get('matmul_case', 'matmul')} {m['matmul_tflops']:.0f} TFLOP/s"
            )
        return line

    def status_table(self) -> str:
        lines = ["| part | slice s | used s | status |", "|---|---|---|---|"]
        for part, seconds in self.steps:
            used = self.used.get(part.name)
            shown = f"{used:.0f}" if used is not None else "-"
            lines.append(f"| {part.name} | {seconds:.0f} | {shown} | {self.status[part.name]} |")
        if self.total_s is not None:
            lines.append(f"| total | {self.budget_s:.0f} | {self.total_s:.0f} | |")
        return "\n".join(lines)

    def markdown(self) -> str:
        out = [
            f"# GPU suite\n\n{self.header()}\n",
            "## Plan\n",
            self.plan_md,
            "",
            "## Status\n",
            self.status_table(),
            "",
            "## Targets\n",
            self.targets_table(),
            "",
        ]
        for part, _ in self.steps:
            rows = [r for r in self.rows if r["part"] == part.name]
            if not rows and not self.notes.get(part.name):
                continue
            out.append(f"## {part.name}\n")
            out += [f"- {n}" for n in self.notes.get(part.name, [])]
            if self.notes.get(part.name):
                out.append("")
            if part.name.startswith("tests"):
                out += [pivot(rows, "case", "metric"), ""]
                continue
            for metric in dict.fromkeys(r["metric"] for r in rows):
                chosen = [r for r in rows if r["metric"] == metric]
                out += [f"{metric}:\n", pivot(chosen, "case", "provider"), ""]
        return "\n".join(out)

    def short_table(self) -> str:
        return "\n".join([self.header(), "", self.status_table(), "", self.targets_table()])

    # ---- targets --------------------------------------------------------------------------

    def _values(self, part: str, metric: str, **match) -> list[dict]:
        return [
            r
            for r in self.rows
            if r["part"] == part
            and r["metric"] == metric
            and all(r.get(k) == v for k, v in match.items())
            and isinstance(r["value"], float)
            and math.isfinite(r["value"])
        ]

    def targets(self) -> list[tuple[str, str, str]]:
        """(target, measured, verdict) per target of issue 14."""
        found = []
        # 1. fwd+bwd >= SDPA's best backend at 4k-16k
        ratios = []
        for r in self._values("attention", "TFLOP/s", mode="fwd_bwd", provider="llamazh"):
            if r["seqlen"] < 4096:
                continue
            others = [
                o["value"]
                for o in self._values("attention", "TFLOP/s", case=r["case"])
                if o["provider"].startswith("sdpa")
            ]
            if others:
                ratios.append((r["value"] / max(others), r["case"]))
        if ratios:
            worst = min(ratios)
            good = sum(x >= 1.0 for x, _ in ratios)
            found.append(
                (
                    "fwd+bwd >= best SDPA backend, 4k-16k",
                    f"{good}/{len(ratios)} cases; worst {worst[0]:.2f}x ({worst[1]})",
                    _verdict(good == len(ratios)),
                )
            )
        # 2. fwd+bwd causal D=128 >= 330 TFLOP/s (at 16k); 3. fwd >= 400 at 8k-16k (D=128)
        for mode, causal, floor, lengths, label in (
            ("fwd_bwd", True, 330.0, (4096, 8192, 16384), "fwd+bwd causal D=128 >= 330 TFLOP/s"),
            ("fwd", True, 400.0, (8192, 16384), "fwd causal D=128 >= 400 TFLOP/s at 8k-16k"),
            ("fwd", False, 400.0, (8192, 16384), "fwd full D=128 >= 400 TFLOP/s at 8k-16k"),
        ):
            rows = self._values(
                "attention", "TFLOP/s", mode=mode, provider="llamazh", head_dim=128, causal=causal
            )
            vals = {r["seqlen"]: r["value"] for r in rows if r["seqlen"] in lengths}
            if vals:
                shown = ", ".join(f"{_k(s)} {v:.0f}" for s, v in sorted(vals.items()))
                best = vals.get(16384, max(vals.values()))
                ok = best >= floor if mode == "fwd_bwd" else min(vals.values()) >= floor
                found.append((label, shown, _verdict(ok)))
        # 4. decode at 64k >= 80% of the copy bandwidth
        vals = [r for r in self._values("decode", "GB/s", provider="llamazh", kv_len=65536)]
        copy = self.meta.get("copy_gbs")
        if vals and copy:
            shown = ", ".join(
                f"Sq={r['q_len']} {r['value']:.0f} GB/s ({r['value'] / copy:.0%})" for r in vals
            )
            found.append(
                (
                    "decode KV=64k >= 80% of copy",
                    shown,
                    _verdict(min(r["value"] for r in vals) >= 0.8 * copy),
                )
            )
        # 5. fused RoPE >= 10x eager (forward + backward)
        vals = self._values("rope", "x eager", provider="llamazh (Triton)", mode="fwd_bwd")
        if vals:
            shown = ", ".join(f"S={_k(r['seqlen'])} {r['value']:.1f}x" for r in vals)
            found.append(
                (
                    "fused RoPE fwd+bwd >= 10x eager",
                    shown,
                    _verdict(min(r["value"] for r in vals) >= 10.0),
                )
            )
        # 6. model step: faster than SDPA, no more memory, same loss
        for case in dict.fromkeys(r["case"] for r in self._values("model", "tokens/s")):
            speed = {
                r["provider"]: r["value"] for r in self._values("model", "tokens/s", case=case)
            }
            mem = {r["provider"]: r["value"] for r in self._values("model", "peak GiB", case=case)}
            rule = self._values("model", "loss rule", case=case)
            if "llamazh" in speed and "sdpa" in speed and "llamazh" in mem and "sdpa" in mem:
                x, m = speed["llamazh"] / speed["sdpa"], mem["llamazh"] / mem["sdpa"]
                loss_ok = bool(rule) and rule[0]["value"] == 1.0
                verdict = "within" if loss_ok else "OUTSIDE" if rule else "unchecked vs"
                shown = f"{x:.2f}x tokens/s, {m:.2f}x peak memory, loss {verdict} the rule"
                found.append(
                    (f"model step {case}", shown, _verdict(x > 1.0 and m <= 1.005 and loss_ok))
                )
        return found

    def targets_table(self) -> str:
        rows = self.targets()
        if not rows:
            return "(no target measured in this run)"
        lines = ["| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in rows]
        return "\n".join(lines)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file beside ``path``: a reader (or a kill) never
    sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the results from other users
    os.replace(tmp, path)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _fmt(value) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "err"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def pivot(rows: list[dict], row_key: str, col_key: str) -> str:
    """A markdown table: one line per ``row_key`` value, one column per ``col_key`` value."""
    row_ids = list(dict.fromkeys(r[row_key] for r in rows))
    col_ids = list(dict.fromkeys(r[col_key] for r in rows))
    cell = {(r[row_key], r[col_key]): _fmt(r["value"]) for r in rows}
    lines = [
        f"| {row_key} | " + " | ".join(map(str, col_ids)) + " |",
        "|---" * (len(col_ids) + 1) + "|",
    ]
    for rid in row_ids:
        lines.append(f"| {rid} | " + " | ".join(cell.get((rid, c), "") for c in col_ids) + " |")
    return "\n".join(lines)
