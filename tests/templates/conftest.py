"""Real tokenizers for the template tests, built once per session in a temporary directory.

* ``llama2-first``: the bundled Llama-2 ``tokenizer.model`` loaded by transformers with a
  ``tokenizer_config.json`` (without one transformers adds no BOS and drops the dummy-prefix
  piece, see NOTES.md); ``legacy=False`` -> ``Metaspace(prepend_scheme="first")``.
* ``llama2-always``: the same with ``legacy=True`` -> every text segment gets the dummy prefix,
  as SentencePiece and the seed's scripts do.
* ``llama2-exact``: ``llamazh.tokenizer.export_hf_tokenizer`` of the same model: a fast
  tokenizer that encodes exactly like SentencePiece (dummy prefix on every segment, whitespace
  runs included).
* ``zh-merged``: Llama-2 merged with a small Chinese model trained here on the bundled d2l-zh
  corpus (``train_sentencepiece`` + ``merge_sentencepiece(scores="rank")``), exported the same
  way.
* ``llama3``: a small byte-level BPE with Llama-3's pre-tokenizer regex and its special tokens.
* ``chatml``: a small byte-level BPE built like SmolLM2's (GPT-2 regex, ``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>`` as ids 0-2); tests/real checks the real one.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# Llama-3's pre-tokenizer pattern (contractions, letters, 1-3 digits, punctuation, newlines)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _write_llama_dir(directory: Path, model: Path | bytes, *, legacy: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    (directory / "tokenizer.model").write_bytes(data)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": legacy,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory, llama2_model_path, corpus_path) -> dict[str, Path]:
    from llamazh.tokenizer import export_hf_tokenizer, merge_sentencepiece, train_sentencepiece

    root = tmp_path_factory.mktemp("tokenizers")
    lines = Path(corpus_path("zh_d2l.txt")).read_text(encoding="utf-8").splitlines()[:1500]
    (root / "zh.txt").write_text("\n".join(lines), encoding="utf-8")
    zh = train_sentencepiece(root / "zh.txt", root / "zh.model", vocab_size=3000, num_threads=1)
    merged = merge_sentencepiece(llama2_model_path, zh, scores="rank")
    return {
        "llama2-first": _write_llama_dir(root / "first", llama2_model_path, legacy=False),
        "llama2-always": _write_llama_dir(root / "always", llama2_model_path, legacy=True),
        "llama2-exact": export_hf_tokenizer(llama2_model_path, root / "exact"),
        "zh-merged": export_hf_tokenizer(merged, root / "zh"),
    }


@pytest.fixture(scope="session")
def hf_tokenizers(tokenizer_dirs, corpus_path) -> dict[str, object]:
    """name -> a transformers tokenizer (see the module docstring)."""
    from transformers import AutoTokenizer

    from llamazh.templates.encoding import _segment_tokenizers

    out = {name: AutoTokenizer.from_pretrained(str(d)) for name, d in tokenizer_dirs.items()}
    out["llama3"] = _llama3_tokenizer(corpus_path)
    out["chatml"] = _chatml_tokenizer(corpus_path)
    with warnings.catch_warnings():  # the legacy=False warning, tested in test_sft.py
        warnings.simplefilter("ignore", UserWarning)
        _segment_tokenizers(out["llama2-first"])
    return out


def _llama3_tokenizer(corpus_path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = []
    for name in ("en_d2l.txt", "zh_d2l.txt"):
        text += Path(corpus_path(name)).read_text(encoding="utf-8").splitlines()[:300]
    tok.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        additional_special_tokens=LLAMA3_SPECIALS[1:4],
    )


CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _chatml_tokenizer(corpus_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=CHATML_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["system user assistant You are a helpful AI assistant named SmolLM"]
    for name in ("en_d2l.txt", "zh_d2l.txt"):
        text += Path(corpus_path(name)).read_text(encoding="utf-8").splitlines()[:300]
    tok.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
