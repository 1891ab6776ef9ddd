"""Deployment formats: GGUF for llama.cpp (and Ollama, LM Studio on top of it)."""

from llamazh.deploy.gguf_export import GGUF_DTYPES, export_gguf, to_ggml_rotary_layout
from llamazh.deploy.gguf_vocab import PRE_TOKENIZERS, pre_tokenizer_name

__all__ = [
    "GGUF_DTYPES",
    "PRE_TOKENIZERS",
    "export_gguf",
    "pre_tokenizer_name",
    "to_ggml_rotary_layout",
]
