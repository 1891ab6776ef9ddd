"""The main job: ``examples/recipe.py --quick`` on the real SmolLM2 end to end, then resumed
from its cache; and the recipe's bad-input rules (interrupted steps, foreign tokenizers)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
STEPS = ("01_base", "02_vocab", "03_cpt", "04_sft", "05_long", "06_merge", "07_spec")
PLOTS = ("loss_curves.png", "bpc_vs_time.png", "long_context.png", "speculative.png")


def _missing_model() -> str | None:
    from llamazh.pretrained import smollm2_available

    ok, why = smollm2_available()
    return None if ok else f"the recipe runs on SmolLM2: {why}"


def _examples_on_path(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))


def _recipe_lib():
    """examples/recipe_lib.py as a module, without touching sys.path (hypothesis tests cannot
    take the function-scoped monkeypatch)."""
    import importlib.util

    name = "recipe_lib_under_test"
    if name not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / "recipe_lib.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def run_recipe(run_dir: Path, *flags: str) -> str:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "recipe.py"), "--quick", "--run-dir", str(run_dir), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_quick_recipe_runs_and_resumes(tmp_path):
    reason = _missing_model()
    if reason:
        pytest.skip(reason)
    run_dir = tmp_path / "run"
    first = run_recipe(run_dir)
    assert "=== Summary ===" in first
    done = {s: json.loads((run_dir / s / "done.json").read_text(encoding="utf-8")) for s in STEPS}
    # the extended tokenizer spends fewer tokens on Chinese and exactly as many on English
    vocab = done["02_vocab"]
    assert vocab["tpc_zh_d2l_ext"] < vocab["tpc_zh_d2l_base"]
    assert vocab["tpc_en_ext"] == vocab["tpc_en_base"]
    # both arms of continued pre-training ran and were measured in bits per character
    for arm in ("ext", "control"):
        assert done["03_cpt"][arm]["steps"] >= 1
        assert 0 < done["03_cpt"][arm]["bpc_zh"] < 20
    # stock from_pretrained on the merged directory reproduces the unmerged adapters
    assert done["06_merge"]["max_logit_diff"] < 1e-3
    # the merged model as GGUF: its tokenizer, read back by transformers, gives the same ids
    assert done["06_merge"]["gguf"]["ids_match"] is True
    # the base was timed again beside the merged model, in turns
    for key in ("zh_chars_per_s", "base_zh_chars_per_s"):
        assert done["06_merge"][key] > 0
    # every speculative method's greedy output equals generate's
    assert done["07_spec"]["identical"] is True
    for png in PLOTS:
        assert (run_dir / png).stat().st_size > 0
    # a second run takes every step from the cache
    second = run_recipe(run_dir)
    assert second.count("(cached in") == len(STEPS)
    assert "=== Summary ===" in second
    # --stop-after runs the steps up to it and no further
    third = run_recipe(run_dir, "--stop-after", "3")
    assert third.count("(cached in") == 3
    assert "stopped after step 3" in third and "=== Summary ===" not in third


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--new-tokens", "0"], "--new-tokens must be > 0, got 0"),
        (["--new-tokens", "10", "--tokenizer", "tok"], "exclude each other"),
        (["--stop-after", "0"], "invalid choice"),
        (["--budget-scale", "-1"], "--budget-scale must be > 0"),
        (["--cpt-samples", "words"], "invalid choice"),
    ],
)
def test_bad_flags_are_refused(argv, message, monkeypatch, capsys):
    _examples_on_path(monkeypatch)
    import recipe

    with pytest.raises(SystemExit):
        recipe.main(argv)
    assert message in capsys.readouterr().err


def test_interrupted_step_leaves_no_result_and_is_redone(tmp_path, monkeypatch):
    _examples_on_path(monkeypatch)
    from recipe_lib import Run

    calls = []

    def broken(d: Path) -> dict:
        (d / "half_written.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-step

    with pytest.raises(KeyboardInterrupt):
        Run(tmp_path).step("01_x", "x", broken)
    assert not (tmp_path / "01_x" / "done.json").exists()

    def good(d: Path) -> dict:
        calls.append(sorted(p.name for p in d.iterdir()))
        return {"value": 1.5}

    assert Run(tmp_path).step("01_x", "x", good)["value"] == 1.5
    assert calls == [[]]  # the half-written folder was cleared before the step ran again
    assert Run(tmp_path).step("01_x", "x", good)["value"] == 1.5  # cached now
    assert len(calls) == 1


class _Tokenizer:
    def __init__(self, vocab: dict[str, int], name: str) -> None:
        self.vocab, self.name_or_path = vocab, name

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)


class _Model:
    def __init__(self, rows: int) -> None:
        import torch

        self.embedding = torch.nn.Embedding(rows, 2)

    def get_input_embeddings(self):
        return self.embedding


def test_a_tokenizer_that_does_not_extend_the_model_is_refused(monkeypatch):
    _examples_on_path(monkeypatch)
    from recipe_adapt import check_extends

    base = _Tokenizer({"a": 0, "b": 1, "c": 2}, "base")
    model = _Model(3)
    check_extends(base, _Tokenizer({"a": 0, "b": 1, "c": 2, "ab": 3}, "ok"), model)
    with pytest.raises(ValueError, match="does not extend the model's own"):
        check_extends(base, _Tokenizer({"b": 0, "a": 1, "c": 2, "ab": 3}, "shuffled"), model)
    with pytest.raises(ValueError, match="does not extend the model's own"):
        check_extends(base, _Tokenizer({"a": 0, "b": 1}, "smaller"), model)
    with pytest.raises(ValueError, match="has 3 tokens, the model 4 rows"):
        check_extends(base, _Tokenizer({"a": 0, "b": 1, "c": 2, "ab": 3}, "ok"), _Model(4))


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(st.text(alphabet="ab中 ", max_size=12), max_size=12),
    block=st.integers(min_value=2, max_value=9),
)
def test_line_rows_start_at_a_boundary_and_keep_lines_whole(lines, block):
    recipe_lib = _recipe_lib()
    sep = -1
    encode = lambda text: [ord(ch) for ch in text]  # noqa: E731  one token per character
    rows = recipe_lib.to_line_rows(lines, encode, sep, block)
    # every row starts at a document boundary and fits the block
    assert all(row[0] == sep and len(row) <= block for row in rows)
    # the rows hold each non-empty line once, in order, cut to block - 1 tokens, never split
    expected = [[sep, *encode(t)[: block - 1]] for t in lines if t]
    got = [[]]
    for row in rows:
        for tok in row:
            if tok == sep:
                got.append([])
            got[-1].append(tok)
    assert got[1:] == expected
    # a row is closed only when the next line would not fit
    for row, nxt in itertools.pairwise(rows):
        first = nxt.index(sep, 1) if sep in nxt[1:] else len(nxt)
        assert len(row) + first > block


def test_row_sampler_pads_and_masks():
    recipe_lib = _recipe_lib()
    rows = [[9, 1, 2, 3], [9, 4]]
    batch = recipe_lib.row_sampler(rows, batch_size=6, seed=0, pad_id=9)(0)
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert ids[:n].tolist() in rows and labels[:n].tolist() == ids[:n].tolist()
        assert (labels[n:] == -100).all() and (ids[n:] == 9).all()
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        recipe_lib.to_line_rows(["a"], list, 0, 1)
