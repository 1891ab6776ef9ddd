"""The main job runs: ``examples/recipe.py --quick`` end to end, then resumes from its cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("01_base", "02_vocab", "03_cpt", "04_sft", "05_long", "06_merge", "07_spec")


def run_recipe(run_dir: Path) -> str:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "recipe.py"),
            "--quick",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_quick_recipe_runs_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    first = run_recipe(run_dir)
    assert "=== Summary ===" in first
    done = {s: json.loads((run_dir / s / "done.json").read_text(encoding="utf-8")) for s in STEPS}
    # the merged checkpoint loaded with stock from_pretrained reproduces the unmerged adapters
    assert done["06_merge"]["max_logit_diff"] < 1e-4
    # greedy speculative decoding is exact
    assert done["07_spec"]["identical"] is True
    # the merged vocabulary spends fewer tokens on Chinese and the same on English
    assert done["02_vocab"]["zh_tpc_merged"] < done["02_vocab"]["zh_tpc_llama2"]
    assert abs(done["02_vocab"]["en_tpc_merged"] - done["02_vocab"]["en_tpc_llama2"]) < 0.01
    for png in ("loss_curves.png", "long_context.png", "speculative.png"):
        assert (run_dir / png).stat().st_size > 0
    # a second run takes every step from the cache
    second = run_recipe(run_dir)
    assert second.count("(cached in") == len(STEPS)
    assert "=== Summary ===" in second
