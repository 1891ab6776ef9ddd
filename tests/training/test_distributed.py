"""FSDP2 (fully_shard) on 2 CPU processes with gloo follows the 1-process loss trajectory."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamazh.testing import assert_close

WORKER = Path(__file__).with_name("fsdp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], out: Path) -> list[float]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=240
    )
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((out / "losses.json").read_text())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_fsdp2_two_processes_match_one_process(tmp_path, monkeypatch):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 not in this torch")
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    out = tmp_path / "fsdp2"
    out.mkdir()
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    runs = {
        "fsdp2": _run([*launch, "--master_port", str(_free_port()), str(WORKER), str(out)], out)
    }
    # the one-process references run here (same code, no process group, no sharding)
    spec = importlib.util.spec_from_file_location("fsdp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    for name, dtype in (("single", torch.float32), ("single64", torch.float64)):
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        worker.train(tmp_path / name, dtype)
        runs[name] = json.loads((tmp_path / name / "losses.json").read_text())
    losses = {
        k: torch.tensor(v, dtype=torch.float64 if k == "single64" else torch.float32)
        for k, v in runs.items()
    }
    assert losses["single"][-1] < losses["single"][0]
    assert_close(
        losses["fsdp2"], losses["single64"], losses["single"], name="FSDP2 loss trajectory"
    )
    sharded = load_file(tmp_path / "fsdp2" / "adapter" / "adapter_model.safetensors")
    single = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "single64" / "adapter" / "adapter_model.safetensors")
    assert sharded.keys() == single.keys()
    for k in sharded:
        assert_close(sharded[k], ref[k], single[k], factor=3.0, name=k)
