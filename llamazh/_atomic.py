"""Atomic writes: build in a temporary sibling, then rename into place.

An interrupted export or merge leaves at most a ``.tmp-<name>-<pid>-<hex>`` sibling, never a
half-written file or directory under the final name; the next write to the same destination
removes such siblings whose process is gone (with a ``UserWarning`` naming them).

What is written gets the modes an ordinary ``open``/``mkdir`` would give under the process
umask (0644 files and 0755 directories with the usual umask 022), not the private 0600/0700 of
``tempfile``: a serving account must be able to read an adapter, a merge or a tokenizer.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove ``.tmp-``/``.old-`` siblings of ``final`` left by a process that no longer runs.

    Returns the removed paths (a ``UserWarning`` names them). Siblings of live processes
    (a concurrent write) and names in another format are left alone.
    """
    pattern = re.compile(rf"^\.(?:tmp|old)-{re.escape(final.name)}-(\d+)-[0-9a-f]+$")
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    if removed:
        warnings.warn(
            f"removed {len(removed)} temporary file(s) left by an interrupted write to "
            f"{str(final)!r}: {', '.join(repr(p.name) for p in removed)}",
            UserWarning,
            stacklevel=3,
        )
    return removed


def _temp_name(final: Path) -> Path:
    return final.with_name(f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block exits cleanly.

    The directory is created with mode ``0o777`` under the umask (what ``mkdir`` gives);
    stale temporaries of an interrupted earlier write to ``path`` are removed first.

    Args:
        path: the final directory; its parent is created if needed.
        overwrite: replace an existing ``path``; otherwise ``FileExistsError`` is raised
            before anything is written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.

    Example:
        >>> with atomic_dir("out/adapter") as tmp:
        ...     (tmp / "adapter_config.json").write_text("{}")
        >>> sorted(p.name for p in Path("out").iterdir())
        ['adapter']
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{str(final)!r} already exists; pass overwrite=True to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = _temp_name(final)
    tmp.mkdir(mode=0o777)
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}-{secrets.token_hex(4)}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path in ``path``'s directory that becomes ``path`` on success.

    The caller writes the temporary path (any writer that takes a file name); it is renamed
    over ``path`` when the block exits cleanly and removed otherwise. The file gets mode
    ``0o666`` under the umask, or the mode of the file it replaces.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.

    Example:
        >>> with atomic_file("model.gguf", overwrite=False) as tmp:
        ...     writer = GGUFWriter(tmp, "llama")
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{str(final)!r} already exists; pass overwrite=True to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = _temp_name(final)
    mode = final.stat().st_mode & 0o7777 if final.is_file() else 0o666
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    if final.is_file():
        os.chmod(tmp, mode)  # keep the replaced file's mode, as an ordinary overwrite would
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory.

    Example:
        >>> atomic_write_bytes("merged.model", proto.SerializeToString())
        PosixPath('merged.model')
    """
    final = Path(path)
    with atomic_file(final) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return final


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))
