"""llamazh: small, orthogonal primitives for adapting LLaMA-family models to a new language.

The curated API is importable from the top level; each name is loaded lazily so that
``import llamazh`` stays cheap and ``from llamazh.rope import YaRNScaling`` imports neither
Triton nor transformers. Importing llamazh arranges for the ``"llamazh"`` attention
implementation to be registered with transformers as soon as transformers is imported.

Shape notation used everywhere: ``(B, S, H, D)`` = batch, sequence, heads, head dim;
``Hkv`` = key/value heads (GQA/MQA), ``Sq``/``Sk`` = query/key lengths.
"""

from __future__ import annotations

import importlib
from typing import Any

from llamazh._hf_hook import on_transformers_import as _on_transformers_import
from llamazh.patching import PatchHandle, patch

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    # vocabulary extension
    "train_sentencepiece": "llamazh.tokenizer",
    "merge_sentencepiece": "llamazh.tokenizer",
    "export_hf_tokenizer": "llamazh.tokenizer",
    "extend_bpe": "llamazh.tokenizer",
    "encoding_efficiency": "llamazh.tokenizer",
    "resize_embeddings": "llamazh.tokenizer",
    # rotary scaling
    "NoScaling": "llamazh.rope",
    "LinearScaling": "llamazh.rope",
    "NTKScaling": "llamazh.rope",
    "DynamicNTKScaling": "llamazh.rope",
    "AdaptiveNTKScaling": "llamazh.rope",
    "YaRNScaling": "llamazh.rope",
    "Llama3Scaling": "llamazh.rope",
    # attention
    "attention": "llamazh.attention",
    "flash_attn_func": "llamazh.attention",
    "flash_attn_varlen_func": "llamazh.attention",
    # training
    "prepare_for_training": "llamazh.training",
    "save_adapter": "llamazh.training",
    "load_adapter": "llamazh.training",
    "merge_adapters": "llamazh.training",
    "align_embeddings": "llamazh.training",
    "bits_per_char": "llamazh.evaluation",
    # generation
    "speculative_generate": "llamazh.speculative",
    "PromptLookupDrafter": "llamazh.speculative",
    "ClassifierFreeGuidance": "llamazh.guidance",
    # templates
    "TEMPLATES": "llamazh.templates",
    "get_template": "llamazh.templates",
    # a real model to run on
    "load_smollm2": "llamazh.pretrained",
    # deployment
    "export_gguf": "llamazh.deploy",
}

__all__ = ["PatchHandle", "__version__", "patch", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llamazh' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


def _register_with_transformers() -> None:
    from llamazh.integrations.hf_attention import register

    register()


_on_transformers_import(_register_with_transformers)
