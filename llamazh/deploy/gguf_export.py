"""Export a merged Llama-family model directory as a GGUF file that llama.cpp runs.

Written with the ``gguf`` package (llama.cpp's own Python writer): hyperparameters and rope
scaling as ``llama.*`` keys, the tokenizer as ``tokenizer.ggml.*`` keys (see
:mod:`llamazh.deploy.gguf_vocab`), tensors renamed by ``gguf``'s tensor-name map. Query and key
projections are permuted from transformers' half-split rotary layout to GGML's interleaved one
(the inverse of what transformers' GGUF reader undoes).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from llamazh._atomic import atomic_file
from llamazh._checks import check_choice
from llamazh._files import open_safetensors, read_json

#: ``dtype`` values of :func:`export_gguf`; 1-D tensors (norms) are always written as f32.
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
#: ``rope_type`` values mapped to GGUF's rope-scaling keys.
GGUF_ROPE_TYPES = ("default", "linear", "yarn")


def export_gguf(
    model_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    dtype: str = "f16",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the Llama-family model in ``model_dir`` (and its tokenizer) as one GGUF file.

    ``model_dir`` is a plain transformers directory (``config.json`` with ``model_type:
    "llama"``, ``*.safetensors``, the tokenizer files), e.g. what :func:`merge_adapters`
    writes. Tied or untied embeddings; rope scaling ``linear`` or ``yarn`` is mapped to
    ``llama.rope.scaling.*``. The vocabulary is SentencePiece BPE (``tokenizer.model``) or
    byte-level BPE (``tokenizer.json``); its size must equal the embedding rows.

    Args:
        model_dir: the model directory.
        out_path: the ``.gguf`` file to create (atomically: a temporary sibling renamed into
            place, so an interrupted export leaves no half-written file).
        dtype: one of :data:`GGUF_DTYPES` for the 2-D weights (``q8_0``: blocks of 32 with
            an f16 scale; rows must be a multiple of 32 wide).
        overwrite: replace an existing ``out_path``.
        progress: print one line per tensor group written.

    Returns:
        ``Path(out_path)``.

    Raises:
        FileExistsError: ``out_path`` exists and ``overwrite`` is false.
        FileNotFoundError: no ``config.json`` or no safetensors weights.
        ValueError: a model family, rope type, vocabulary type or dtype the export does not
            support; a tokenizer whose size differs from the embedding rows; tensors the GGUF
            ``llama`` layout has no name for (biases). Every check runs before anything is
            written.

    Example:
        >>> merge_adapters("SmolLM2-135M", "runs/zh-lora", "zh-merged")
        >>> export_gguf("zh-merged", "zh-merged.f16.gguf", dtype="f16")
        >>> # llama-cli -m zh-merged.f16.gguf -p "你好"
    """
    try:
        import gguf
    except ImportError as exc:
        raise ImportError("export_gguf needs gguf: pip install 'llamazh[real]'") from exc

    from llamazh.deploy.gguf_vocab import read_vocab

    check_choice("dtype", dtype, GGUF_DTYPES)
    src, out = Path(model_dir), Path(out_path)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"out_path={str(out)!r} already exists; choose another name or pass overwrite=True"
        )
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"model_dir={str(src)!r} has no config.json")
    config = read_json(src / "config.json", "a model config")
    if config.get("model_type") != "llama":
        raise ValueError(
            f"model_dir={str(src)!r} holds a {config.get('model_type')!r} model; export_gguf "
            "supports the Llama family (model_type 'llama': Llama 1-3, SmolLM2, Chinese-LLaMA)"
        )
    shapes = _tensor_shapes(src)
    vocab = read_vocab(src)
    rows = shapes["model.embed_tokens.weight"][0]
    if len(vocab.tokens) != rows:
        raise ValueError(
            f"the tokenizer in model_dir has {len(vocab.tokens)} tokens but the model has {rows} "
            "embedding rows; resize the model to its tokenizer (llamazh.tokenizer."
            "resize_embeddings) or save the tokenizer it was trained with"
        )
    hp = _hyperparameters(config, rows)
    tied = "lm_head.weight" not in shapes or bool(config.get("tie_word_embeddings"))
    names = _gguf_names(shapes, hp["n_layers"], tied)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[dtype]
    if dtype == "q8_0":
        narrow = [k for k, s in shapes.items() if len(s) == 2 and s[1] % 32]
        if narrow:
            raise ValueError(
                f"dtype='q8_0' needs rows a multiple of 32 wide; {narrow[0]} is {shapes[narrow[0]]}"
            )

    with atomic_file(out, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _write_metadata(writer, gguf, hp, vocab, dtype)
        for hf_name, gguf_name in names.items():
            tensor = _load(src, hf_name)
            if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = hp["n_heads"] if "q_proj" in hf_name else hp["n_kv_heads"]
                tensor = to_ggml_rotary_layout(tensor, heads)
            data = tensor.float().numpy()
            if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(gguf_name, data)
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(gguf_name, data.astype("float16"))
            else:
                writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            if progress and gguf_name.endswith("attn_norm.weight"):
                layer = int(gguf_name.split(".")[1]) + 1
                print(f"export_gguf: layer {layer}/{hp['n_layers']}", file=sys.stderr, flush=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    return out


def to_ggml_rotary_layout(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a q/k projection's output rows from transformers' rotary layout to GGML's.

    transformers rotates the pairs ``(i, i + D/2)`` of each head (``rotate_half``); GGML's
    ``rope`` rotates adjacent pairs ``(2i, 2i + 1)``. Row ``h*D + j*D/2 + i`` moves to
    ``h*D + 2i + j``.

    Args:
        weight: ``(n_heads * D, hidden)`` projection weight.
        n_heads: heads of this projection (key/value heads for ``k_proj``).

    Returns:
        The permuted ``(n_heads * D, hidden)`` weight.

    Example:
        >>> w = to_ggml_rotary_layout(model.layers[0].self_attn.q_proj.weight, 9)
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"weight has {rows} rows, not a multiple of 2 * n_heads={2 * n_heads}")
    half = rows // n_heads // 2
    # (H*D, C) -> (H, 2, D/2, C) -> (H, D/2, 2, C) -> (H*D, C)
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _tensor_shapes(src: Path) -> dict[str, tuple[int, ...]]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model_dir={str(src)!r} has no .safetensors weights")
    shapes = {}
    for f in files:
        with open_safetensors(f) as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    if "model.embed_tokens.weight" not in shapes:
        raise ValueError(f"model_dir={str(src)!r} has no 'model.embed_tokens.weight' tensor")
    return shapes


def _load(src: Path, key: str) -> torch.Tensor:
    for f in sorted(src.glob("*.safetensors")):
        with open_safetensors(f) as handle:
            if key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                return handle.get_tensor(key)
    raise KeyError(key)  # _tensor_shapes found it: unreachable unless files changed


def _gguf_names(shapes: dict[str, tuple[int, ...]], n_layers: int, tied: bool) -> dict[str, str]:
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    names, unknown = {}, []
    for key in shapes:
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue
        name = table.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or not key.endswith(".weight"):
            unknown.append(key)
            continue
        names[key] = name  # get_name keeps the matched suffix
    if unknown:
        raise ValueError(
            f"tensors with no GGUF 'llama' name: {unknown[:5]}; export_gguf supports Llama "
            "without biases (attention_bias/mlp_bias false)"
        )
    return names


def _hyperparameters(config: dict[str, Any], rows: int) -> dict[str, Any]:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    check_choice("config.json rope_type", kind, GGUF_ROPE_TYPES)
    if kind in ("linear", "yarn") and not float(rope.get("factor", 0)) > 0:
        raise ValueError(f"config.json rope {kind!r} scaling needs a factor > 0, got {rope}")
    attention = rope.get("attention_factor")
    if kind == "yarn" and attention is not None:
        default = 0.1 * math.log(float(rope["factor"])) + 1
        if not math.isclose(float(attention), default, rel_tol=1e-6):
            raise ValueError(
                f"config.json yarn attention_factor={attention} differs from the default "
                f"0.1 ln(factor) + 1 = {default:.4f} that llama.cpp uses; export_gguf cannot "
                "carry it"
            )
    return {
        "n_layers": int(config["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(config.get("num_key_value_heads") or heads),
        "hidden": hidden,
        "ffn": int(config["intermediate_size"]),
        "head_dim": int(config.get("head_dim") or hidden // heads),
        "context": int(config.get("max_position_embeddings", 2048)),
        "eps": float(config.get("rms_norm_eps", 1e-6)),
        "theta": float(theta),
        "rope": (kind, rope),
        "vocab": rows,
    }


def _write_metadata(
    writer: Any,
    gguf: Any,
    hp: dict[str, Any],
    vocab: Any,
    dtype: str,
) -> None:
    # no general.name: transformers' GGUF reader takes it for a path (_model_name_or_path) and
    # loads nothing when a directory of that name is in the working directory
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[dtype]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["n_layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["n_heads"])
    writer.add_head_count_kv(hp["n_kv_heads"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["n_heads"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_rope_freq_base(hp["theta"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_vocab_size(hp["vocab"])
    kind, rope = hp["rope"]
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(
            gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN
        )
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if kind == "yarn":
        original = rope.get("original_max_position_embeddings") or hp["context"] / rope["factor"]
        writer.add_rope_scaling_orig_ctx_len(int(original))
        if "beta_fast" in rope:
            writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if "beta_slow" in rope:
            writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "eot": writer.add_eot_token_id,
    }
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
