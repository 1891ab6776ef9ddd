"""Files a server can read: umask modes, stale temporaries removed, corrupt files named."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from llamazh._atomic import atomic_dir, atomic_file, atomic_write_text
from llamazh._files import load_safetensors, open_safetensors, read_json


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_modes_follow_the_umask(tmp_path, umask022):
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f.json").write_text("{}")
    assert _mode(tmp_path / "d") == 0o755
    assert _mode(tmp_path / "d" / "f.json") == 0o644
    atomic_write_text(tmp_path / "x.txt", "hi")
    assert _mode(tmp_path / "x.txt") == 0o644
    os.chmod(tmp_path / "x.txt", 0o640)  # an overwrite keeps the file's mode, as open() does
    atomic_write_text(tmp_path / "x.txt", "again")
    assert _mode(tmp_path / "x.txt") == 0o640
    os.umask(0o077)
    with atomic_dir(tmp_path / "private") as tmp:
        (tmp / "f").write_text("")
    assert _mode(tmp_path / "private") == 0o700


def test_stale_temporaries_of_a_dead_writer_are_removed(tmp_path):
    pid = _dead_pid()
    stale_dir = tmp_path / f".tmp-adapter-{pid}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "adapter_model.safetensors").write_bytes(b"x" * 100)
    stale_old = tmp_path / f".old-adapter-{pid}-ffff0000"
    stale_old.mkdir()
    live = tmp_path / f".tmp-adapter-{os.getppid()}-0123abcd"  # a live process: left alone
    live.mkdir()
    other = tmp_path / f".tmp-adapter2-{pid}-0123abcd"  # another destination: left alone
    other.mkdir()
    with (
        pytest.warns(UserWarning, match="interrupted write") as record,
        atomic_dir(tmp_path / "adapter") as tmp,
    ):
        (tmp / "a").write_text("")
    assert stale_dir.name in str(record[0].message)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["adapter", live.name, other.name])
    stale_file = tmp_path / f".tmp-m.gguf-{pid}-00ff00ff"
    stale_file.write_bytes(b"half")
    with pytest.warns(UserWarning, match=r"\.tmp-m\.gguf"), atomic_file(tmp_path / "m.gguf") as t:
        t.write_bytes(b"whole")
    assert not stale_file.exists() and (tmp_path / "m.gguf").read_bytes() == b"whole"


def test_interrupted_file_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "m.gguf") as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "m.gguf").write_bytes(b"mine")
    with (
        pytest.raises(FileExistsError, match=r"m\.gguf"),
        atomic_file(tmp_path / "m.gguf", overwrite=False),
    ):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_kill_9_then_next_write_cleans_up(tmp_path):
    script = (
        "import os, signal, sys\n"
        "from llamazh._atomic import atomic_dir\n"
        f"with atomic_dir({str(tmp_path / 'out')!r}) as tmp:\n"
        "    (tmp / 'big').write_bytes(b'0' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, check=False)
    assert proc.returncode == -9
    assert [p.name.startswith(".tmp-out-") for p in tmp_path.iterdir()] == [True]
    with pytest.warns(UserWarning, match="interrupted write"), atomic_dir(tmp_path / "out"):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_corrupt_files_are_named(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "adapter_model.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(good))
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated\.safetensors.*should be a safetensors file"):
        load_safetensors(bad)
    with pytest.raises(ValueError, match=r"truncated\.safetensors"), open_safetensors(bad):
        pass
    with open_safetensors(good) as f:
        assert list(f.keys()) == ["w"]
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text('{"r": 8,')
    with pytest.raises(ValueError, match=r"adapter_config\.json.*a PEFT adapter config"):
        read_json(cfg, "a PEFT adapter config")
    cfg.write_text(json.dumps({"r": 8}))
    assert read_json(cfg) == {"r": 8}


def test_adapter_readers_name_corrupt_files(tmp_path):
    from llamazh.training import merge_adapters
    from llamazh.training.adapters import read_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{broken")
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        read_adapter(adapter)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors"):
        read_adapter(adapter)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        merge_adapters(base, adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
