"""Trainer under DDP, DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo) follows the
1-process loss trajectory, and its checkpoint is an adapter that reproduces the trained logits
(ZeRO-3 gathers the partitioned tensors on save). FSDP2: tests/training/test_distributed.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamazh.testing import assert_close, tiny_llama
from llamazh.training import load_adapter

pytestmark = pytest.mark.usefixtures("trainer_runs")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not built", allow_module_level=True)

WORKER = Path(__file__).with_name("trainer_worker.py")
ROOT = Path(__file__).resolve().parents[2]
# one launch per engine, each on another layout, so that the three together cover tied and
# untied models and both trainable embedding modes
ENGINES = [("ddp", False, "new_rows"), ("zero2", False, "full"), ("zero3", True, "new_rows")]


def _worker():
    spec = importlib.util.spec_from_file_location("trainer_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, engine: str, tied: bool, mode: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    args += ["--master_port", str(_free_port()), str(WORKER), str(out), engine]
    args += ["tied" if tied else "untied", mode]
    # the first DeepSpeed launch on a machine compiles its shared-memory op (minutes)
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=480
    )
    if proc.returncode != 0:
        raise AssertionError(f"{engine} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize(("engine", "tied", "mode"), ENGINES)
def test_engine_matches_one_process(tmp_path, monkeypatch, engine, tied, mode):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="pip install 'llamazh[test]' brings DeepSpeed")
    worker = _worker()
    _launch(tmp_path / engine, engine, tied, mode)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    for name, dtype in (("single", torch.float32), ("single64", torch.float64)):
        worker.main(tmp_path / name, "single", tied, mode, dtype)
    losses = {
        name: torch.tensor(json.loads((tmp_path / name / "losses.json").read_text()))
        for name in (engine, "single", "single64")
    }
    assert losses["single"][-1] < losses["single"][0]
    assert_close(losses[engine], losses["single64"].double(), losses["single"], name="losses")

    ckpt = f"checkpoint-{worker.STEPS}"
    adapters = {
        name: load_file(tmp_path / name / ckpt / "adapter_model.safetensors")
        for name in (engine, "single", "single64")
    }
    assert adapters[engine].keys() == adapters["single"].keys()
    for key, ref in adapters["single64"].items():
        assert_close(adapters[engine][key], ref, adapters["single"][key], factor=3.0, name=key)

    # the checkpoint, loaded onto a fresh base, reproduces what the engine's model computed
    base = tiny_llama(seed=0, vocab_size=256, tie_word_embeddings=tied)
    logits = load_adapter(base, tmp_path / engine / ckpt).model(worker.probe_ids()).logits
    assert torch.equal(logits, torch.load(tmp_path / engine / "logits.pt"))
