"""benchmarks/gpu_suite.py: the plan fits its budget, the CPU dry run writes every output, the
targets are read correctly off the rows, and (slow) the smoke run measures on the CPU."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_report  # noqa: E402
import gpu_suite  # noqa: E402


def _run(out: Path, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}  # no GPU: dry run
    env.pop("TRITON_INTERPRET", None)  # the suite decides
    return subprocess.run(
        [sys.executable, str(SUITE), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.parametrize("budget", [420.0, 240.0, 100.0])
def test_slices_fill_the_budget_less_the_reserve(budget):
    steps = gpu_suite.plan(budget, None)
    assert [p.name for p, _ in steps] == [p.name for p in gpu_suite.PARTS]
    assert math.isclose(sum(s for _, s in steps), budget - gpu_suite.RESERVE_S)
    assert all(s > 0 for _, s in steps)
    # at the default budget the H200 estimates leave every part a margin
    if budget == gpu_suite.DEFAULT_BUDGET_S:
        assert all(p.estimate_s < s for p, s in steps)
    only = gpu_suite.plan(budget, ["attention", "decode"])
    assert [p.name for p, _ in only] == ["attention", "decode"]
    assert math.isclose(sum(s for _, s in only), budget - gpu_suite.RESERVE_S)


def test_time_left_by_a_part_rolls_forward():
    steps = gpu_suite.plan(420.0, None)
    first, second = steps[0][1], steps[1][1]
    # on time: the second part ends where the plan ends it
    assert gpu_suite.soft_deadline(steps, "tests_gpu", 0.0, first) == first + second
    # early: it may use what the first part left over
    assert gpu_suite.soft_deadline(steps, "tests_gpu", 0.0, 1.0) == first + second
    # late: it still gets half its slice
    late = first + second
    assert gpu_suite.soft_deadline(steps, "tests_gpu", 0.0, late) == late + 0.5 * second


def test_dry_run_on_cpu_writes_every_output(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("results.csv", "table.md", "log.txt"):
        assert (tmp_path / name).is_file(), name
    table = (tmp_path / "table.md").read_text()
    log = (tmp_path / "log.txt").read_text()
    for part in gpu_suite.PARTS:
        assert f"| {part.name} |" in table and f"| {part.name} |" in log
    assert table.count("skipped: needs a CUDA GPU, none on this machine (dry run)") == len(
        [p for p in gpu_suite.PARTS if p.needs_cuda]
    )
    assert "versions only" in table  # the env part ran, without ceilings
    assert "| total | 405 (+15 reserve) |" in log  # the plan is printed first
    assert done.stdout.rstrip().endswith("(no target measured in this run)")  # short table last
    with open(tmp_path / "results.csv") as f:
        assert next(iter(csv.reader(f)))[:5] == list(gpu_report.META_COLUMNS)


def test_dry_run_flag_and_bad_arguments(tmp_path):
    done = _run(tmp_path, "--dry-run", "--only", "rope", "--budget-s", "60")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| rope | 45 | 0 | skipped: --dry-run |" in (tmp_path / "table.md").read_text()
    bad = _run(tmp_path, "--budget-s", "10")
    assert bad.returncode == 2 and "--budget-s must be more than" in bad.stderr


def _report(rows: list[dict], meta: dict) -> gpu_report.Report:
    report = gpu_report.Report(gpu_suite.plan(420.0, None), budget_s=420.0, plan_md="")
    report.handle({"event": "meta", "meta": meta})
    for row in rows:
        report.handle({"event": "row", "row": {"note": "", **row}})
    return report


def test_targets_are_read_off_the_rows():
    rows = []
    for s in (4096, 8192, 16384):
        for mode, ours, sdpa in (("fwd_bwd", 340.0, 300.0), ("fwd", 410.0, 380.0)):
            case = f"{mode} causal D=128 S={s}"
            common = dict(
                part="attention",
                case=case,
                metric="TFLOP/s",
                unit="TFLOP/s",
                mode=mode,
                causal=True,
                head_dim=128,
                seqlen=s,
            )
            rows += [
                dict(common, provider="llamazh", value=ours),
                dict(common, provider="sdpa-flash", value=sdpa),
                dict(common, provider="sdpa-cudnn", value=float("nan")),
            ]
    rows.append(
        dict(
            part="decode",
            case="decode Sq=1 KV=64k",
            provider="llamazh",
            metric="GB/s",
            unit="GB/s",
            value=3000.0,
            kv_len=65536,
            q_len=1,
        )
    )
    rows.append(
        dict(
            part="rope",
            case="fwd_bwd S=8k",
            provider="llamazh (Triton)",
            metric="x eager",
            unit="x",
            value=12.0,
            mode="fwd_bwd",
            seqlen=8192,
        )
    )
    model = dict(part="model", case="m B=4 S=4096")
    rows += [
        dict(model, provider="sdpa", metric="tokens/s", unit="tokens/s", value=1.0e5),
        dict(model, provider="llamazh", metric="tokens/s", unit="tokens/s", value=1.2e5),
        dict(model, provider="sdpa", metric="peak GiB", unit="GiB", value=10.0),
        dict(model, provider="llamazh", metric="peak GiB", unit="GiB", value=9.0),
        dict(model, provider="llamazh", metric="loss rule", unit="ok", value=1.0),
    ]
    report = _report(rows, {"copy_gbs": 4300.0, "matmul_tflops": 790.0})
    verdicts = {t: v for t, _, v in report.targets()}
    assert verdicts == {
        "fwd+bwd >= best SDPA backend, 4k-16k": "met",
        "fwd+bwd causal D=128 >= 330 TFLOP/s": "met",
        "fwd causal D=128 >= 400 TFLOP/s at 8k-16k": "met",
        "decode KV=64k >= 80% of copy": "MISSED",  # 3000 / 4300 = 70%
        "fused RoPE fwd+bwd >= 10x eager": "met",
        "model step m B=4 S=4096": "met",
    }
    assert report.rows[0]["of_ceiling"] == round(340.0 / 790.0, 3)
    table = report.markdown()
    assert "| fwd_bwd causal D=128 S=4096 | 340 | 300 | err |" in table
    assert "MISSED" in report.short_table()


@pytest.mark.slow
def test_smoke_run_measures_on_the_cpu(tmp_path):
    done = _run(tmp_path, "--smoke", "--only", "decode", "model", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    decode = [r for r in rows if r["part"] == "decode" and r["provider"] == "llamazh"]
    assert decode and all(float(r["value"]) > 0 for r in decode)
    rule = [r for r in rows if r["metric"] == "loss rule"]
    assert [float(r["value"]) for r in rule] == [1.0], rule


@pytest.mark.slow
def test_a_hung_part_is_killed_a_crashed_one_reported_and_the_rest_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAZH_GPU_SUITE_FAULT", "hang:env,crash:rope")
    done = _run(tmp_path, "--only", "env", "rope", "model", "--budget-s", "40", "--grace-s", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert "| env | 4 |" in table and "killed: past its slice + grace |" in table
    assert "| rope | 7 |" in table and "crashed (exit 139) |" in table
    assert "| model | 13 | 0 | skipped: needs a CUDA GPU" in table  # a third child ran it


def test_pytest_part_runs_and_counts(tmp_path):
    import json
    import time

    import gpu_child
    import gpu_parts

    events = tmp_path / "events.jsonl"
    ctx = gpu_child.Ctx(events, "tests_gpu", time.time() + 120, cuda=False, smoke=False)
    gpu_parts._pytest(ctx, ["tests/kernels/test_tune_cap.py"])
    rows = [e["row"] for e in map(json.loads, events.read_text().splitlines()) if "row" in e]
    assert {r["metric"]: r["value"] for r in rows} == {
        "passed": 6.0, "failed": 0.0, "error": 0.0, "skipped": 0.0
    }  # fmt: skip
    assert ctx.status == "ok"


def test_a_killed_pytest_run_is_counted_from_its_per_test_lines():
    import gpu_parts

    lines = [
        "[gw0] [ 10%] PASSED tests/kernels/test_a.py::test_x[1]\n",
        "[gw1] [ 20%] FAILED tests/kernels/test_a.py::test_y\n",
        "[gw1] [ 30%] SKIPPED tests/rope/test_kernel.py::test_z\n",
        "[gw0] [ 40%] PASSED tests/kernels/test_a.py::test_x[2]\n",
    ]
    counts, failures = gpu_parts._outcomes(lines)
    assert counts == {"passed": 2, "failed": 1, "skipped": 1}
    assert failures == ["[gw1] [ 20%] FAILED tests/kernels/test_a.py::test_y"]
    done = [*lines, "FAILED tests/kernels/test_a.py::test_y - AssertionError\n",
            "==== 1 failed, 2 passed, 1 skipped in 3.2s ====\n"]  # fmt: skip
    counts, failures = gpu_parts._outcomes(done)
    assert counts == {"failed": 1, "passed": 2, "skipped": 1}
    assert failures == ["FAILED tests/kernels/test_a.py::test_y - AssertionError"]
