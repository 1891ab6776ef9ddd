"""Fold LoRA adapters into a safetensors checkpoint, one shard at a time.

For every base shard: read it, add ``B @ A * scaling`` (in fp32, rounded once to the weight's
dtype) of each adapter in order to the weights they target, replace embed_tokens/lm_head by the
adapters' trained matrices or rows, write the shard. Adapter tensors are read lazily from their
safetensors files, so peak memory is about one shard plus one tensor in fp32, whatever the
model size. The output is a standard transformers model directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llamazh._atomic import atomic_dir
from llamazh._files import open_safetensors, read_json
from llamazh.training.adapters import (
    CONFIG_NAME,
    PICKLE_NAME,
    PREFIX,
    ROWS_SUFFIX,
    WEIGHTS_NAME,
    check_fits,
)
from llamazh.training.adapters import read_adapter as _read_all
from llamazh.training.config import AdapterConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")


@dataclass
class _Adapter:
    """One adapter: its config and lazy access to its tensors by normalised key."""

    path: Path
    config: AdapterConfig
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    _eager: dict[str, Tensor] | None = None
    _keys: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> Tensor:
        if self._eager is not None:
            return self._eager[key]
        with open_safetensors(self.path / WEIGHTS_NAME) as f:
            return f.get_tensor(self._keys[key])

    def lora_modules(self) -> list[str]:
        return sorted(
            k.removesuffix(".lora_A.weight") for k in self.shapes if k.endswith(".lora_A.weight")
        )


def _open_adapter(path: Path, allow_pickle: bool, tied: bool) -> _Adapter:
    raw_cfg = (
        read_json(path / CONFIG_NAME, "a PEFT adapter config")
        if (path / CONFIG_NAME).is_file()
        else None
    )
    if raw_cfg is None:
        raise FileNotFoundError(f"{str(path)!r} is not an adapter directory: no {CONFIG_NAME}")
    config = AdapterConfig.from_peft(
        raw_cfg, embed_name="embed_tokens", head_name="lm_head", tied=tied
    )
    if (path / WEIGHTS_NAME).is_file():
        keys, shapes = {}, {}
        with open_safetensors(path / WEIGHTS_NAME) as f:
            for raw in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                key = _normalise(raw)
                keys[key] = raw
                shapes[key] = tuple(f.get_slice(raw).get_shape())
            metadata = dict(f.metadata() or {})
        return _Adapter(path, config, shapes, metadata, None, keys)
    if (path / PICKLE_NAME).is_file():
        _, tensors = _read_all(path, allow_pickle=allow_pickle)  # raises unless allowed
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        return _Adapter(path, config, shapes, {}, tensors)
    raise FileNotFoundError(f"{str(path)!r} has neither {WEIGHTS_NAME} nor {PICKLE_NAME}")


def _normalise(key: str) -> str:
    import re

    key = key.removeprefix(PREFIX)
    key = re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", key)
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)


def _base_layout(
    base: Path,
) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """weight_map (key -> shard file name) and key -> (shape, dtype), from headers only."""
    if (base / INDEX_NAME).is_file():
        weight_map = read_json(base / INDEX_NAME, "a safetensors index")["weight_map"]
    elif (base / SINGLE_NAME).is_file():
        with open_safetensors(base / SINGLE_NAME) as f:
            weight_map = {k: SINGLE_NAME for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    else:
        found = sorted(p.name for p in base.glob("*.bin"))
        raise FileNotFoundError(
            f"base_dir={str(base)!r} has no {SINGLE_NAME} or {INDEX_NAME}"
            + (f" (only pickled {found}: convert it to safetensors first)" if found else "")
        )
    info = {}
    for shard in sorted(set(weight_map.values())):
        with open_safetensors(base / shard) as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = f.get_slice(k)
                info[k] = (tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
    return weight_map, info


_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _embedding_plan(adapters, embed_key, head_key, info, tied):
    """Check vocabulary/shape agreement; return the final (vocab, untie)."""
    vocab, hidden = info[embed_key][0]
    vocabs = {"embed": vocab, "head": vocab}
    for a in adapters:
        for what, short, mode in (
            ("embed", "embed_tokens", a.config.embeddings),
            ("head", "lm_head", a.config.lm_head),
        ):
            key = embed_key if what == "embed" else head_key
            if mode == "full":
                shape = a.shapes.get(key)
                if shape is None or len(shape) != 2 or shape[1] != hidden:
                    raise ValueError(
                        f"adapter {str(a.path)!r} trains {short} in full but its tensor {key!r} is "
                        f"{'missing' if shape is None else shape}; expected (vocab, {hidden})"
                    )
                vocabs[what] = shape[0]
            elif mode == "new_rows":
                ids = a.config.new_token_ids
                top = max(ids) + 1
                missing = sorted(set(range(vocabs[what], top)) - set(ids))
                if missing:
                    raise ValueError(
                        f"adapter {str(a.path)!r} trains {short} rows up to id {top - 1} but the "
                        f"vocabulary is {vocabs[what]} at that point and rows {missing[:5]} are "
                        "not in the adapter; resize the base to the adapter's tokenizer first"
                    )
                vocabs[what] = max(vocabs[what], top)
        check_fits(a.path, a.metadata, vocab=vocabs["embed"], tied=tied)
    if vocabs["embed"] != vocabs["head"]:
        raise ValueError(
            f"after merging, embed_tokens has {vocabs['embed']} rows but lm_head has "
            f"{vocabs['head']}; the adapters disagree about the vocabulary size"
        )
    untie = tied and any(
        a.config.embeddings != a.config.lm_head or a.config.lm_head == "full" for a in adapters
    )
    return vocabs["embed"], untie


def _apply_embedding(weight: Tensor, adapters, key: str, what: str) -> Tensor:
    for a in adapters:
        mode = a.config.embeddings if what == "embed" else a.config.lm_head
        if mode == "full":
            weight = a.get(key).to(weight.dtype)
        elif mode == "new_rows":
            rows_key = key.removesuffix(".weight") + ROWS_SUFFIX
            if rows_key not in a.shapes:  # tied adapters store the embedding's rows only
                rows_key = next(k for k in a.shapes if k.endswith(ROWS_SUFFIX))
            ids = torch.tensor(a.config.new_token_ids, dtype=torch.long)
            top = int(ids.max()) + 1
            if top > weight.shape[0]:
                weight = torch.cat(
                    [weight, weight.new_zeros(top - weight.shape[0], weight.shape[1])]
                )
            weight = weight.index_copy(0, ids, a.get(rows_key).to(weight.dtype))
    return weight


def merge_adapters(
    base_dir: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> Path:
    """Merge one or several PEFT-format LoRA adapters into a safetensors model, shard by shard.

    Adapters apply in order (Chinese-Alpaca-Plus: the LLaMA-Plus adapter, then the Alpaca
    adapter): each adds ``B @ A * alpha / r`` (fp32, rounded once) to the weights it targets;
    embeddings/lm_head trained in full replace the current matrix, new rows overwrite their
    rows (extending the vocabulary when the rows cover it). The output keeps the base's shard
    layout plus ``config.json`` (``vocab_size`` updated) and the tokenizer files of the last
    adapter directory that has any, else the base's; stock ``from_pretrained`` loads it.

    Args:
        base_dir: a transformers model directory with ``model.safetensors`` or a sharded index.
        adapters: one adapter directory or a sequence of them.
        out_dir: created atomically (temporary sibling, then rename).
        overwrite: replace an existing ``out_dir``.
        allow_pickle: read pickled ``adapter_model.bin`` files (``torch.load(weights_only=True)``).
        progress: show a tqdm bar over shards.

    Returns:
        ``Path(out_dir)``.

    Raises:
        FileExistsError: ``out_dir`` exists and not ``overwrite``.
        FileNotFoundError: missing base weights (pickled-only bases are refused) or adapter files.
        ValueError: an adapter targets modules the base lacks, shape or vocabulary mismatch,
            a pickled adapter without ``allow_pickle``. Nothing is written in any error case.

    Example:
        >>> merge_adapters("llama-2-7b", ["chinese-llama-2-lora", "chinese-alpaca-2-lora"], "out")
    """
    base = Path(base_dir)
    out = Path(out_dir)
    paths = (
        [Path(adapters)]
        if isinstance(adapters, (str, os.PathLike))
        else [Path(a) for a in adapters]
    )
    if not paths:
        raise ValueError("adapters is empty; pass at least one adapter directory")
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"out_dir={str(out)!r} already exists; pass overwrite=True to replace it"
        )
    if out.resolve() in {base.resolve(), *(p.resolve() for p in paths)}:
        raise ValueError(
            f"out_dir={str(out)!r} must differ from base_dir and the adapter directories"
        )
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"base_dir={str(base)!r} has no config.json")
    config = read_json(base / "config.json", "a model config")
    weight_map, info = _base_layout(base)
    embed_key = next((k for k in info if k.endswith("embed_tokens.weight")), None)
    head_key = "lm_head.weight"
    if embed_key is None:
        raise ValueError(f"base_dir={str(base)!r} has no '*embed_tokens.weight' tensor")
    tied = head_key not in info
    opened = [_open_adapter(p, allow_pickle, tied) for p in paths]
    lora: dict[str, list[tuple[_Adapter, str]]] = {}
    for a in opened:
        modules = a.lora_modules()
        if not modules:
            raise ValueError(f"adapter {str(a.path)!r} has no LoRA tensors")
        for m in modules:
            key = f"{m}.weight"
            if key not in info:
                raise ValueError(
                    f"adapter {str(a.path)!r} targets {m!r} (target_modules="
                    f"{a.config.target_modules!r}) but the base has no tensor {key!r}"
                )
            (out_f, in_f), ra, rb = (
                info[key][0],
                a.shapes[f"{m}.lora_A.weight"],
                a.shapes.get(f"{m}.lora_B.weight"),
            )
            if rb is None or ra[1] != in_f or rb[0] != out_f or ra[0] != rb[1]:
                raise ValueError(
                    f"adapter {str(a.path)!r}: {m} has lora_A {ra} and lora_B {rb}, which do not "
                    f"fit the base weight ({out_f}, {in_f})"
                )
            lora.setdefault(key, []).append((a, m))
    vocab, untie = _embedding_plan(opened, embed_key, head_key, info, tied)

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    new_map = dict(weight_map)
    if untie:
        new_map[head_key] = weight_map[embed_key]
    total = 0
    untied_done = False
    with atomic_dir(out, overwrite=overwrite) as tmp:
        shards = sorted(set(weight_map.values()))
        for shard in tqdm(shards, desc="merging shards", unit="shard", disable=not progress):
            tensors: dict[str, Tensor] = {}
            with open_safetensors(base / shard) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    t = f.get_tensor(key)
                    if key in lora:
                        w = t.float()  # (out, in) fp32 accumulator
                        for a, m in lora[key]:
                            b = a.get(f"{m}.lora_B.weight").float()
                            w.addmm_(b, a.get(f"{m}.lora_A.weight").float(), alpha=a.config.scaling)
                        t = w.to(t.dtype)
                        del w
                    elif key == embed_key:
                        base_embed = t
                        t = _apply_embedding(t, opened, embed_key, "embed")
                        if untie:
                            head = _apply_embedding(base_embed, opened, head_key, "head")
                            if torch.equal(head, t):
                                del new_map[head_key]
                            else:
                                tensors[head_key] = head
                                untied_done = True
                        del base_embed
                    elif key == head_key:
                        t = _apply_embedding(t, opened, head_key, "head")
                    tensors[key] = t.contiguous()
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1 or (base / INDEX_NAME).is_file():
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config["vocab_size"] = vocab
        if untied_done:
            config["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _copy_side_files(base, paths, tmp)
    return out


def _copy_side_files(base: Path, adapters: list[Path], dest: Path) -> None:
    """Copy the base's other files (generation config, ...) and one coherent tokenizer."""
    tok_source = next(
        (p for p in reversed(adapters) if any((p / n).is_file() for n in TOKENIZER_FILES)), base
    )
    for p in base.iterdir():
        skip = p.name.startswith(".") or p.name == "config.json" or p.name in TOKENIZER_FILES
        if p.is_file() and not skip and not p.name.endswith(_NOT_COPIED):
            shutil.copy2(p, dest / p.name)
    for name in TOKENIZER_FILES:
        if (tok_source / name).is_file():
            shutil.copy2(tok_source / name, dest / name)
