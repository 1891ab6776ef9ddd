"""Vocabulary extension: train, merge, export, measure, resize.

The Chinese-LLaMA recipe as five functions::

    from llamazh.tokenizer import (train_sentencepiece, merge_sentencepiece,
                                   export_hf_tokenizer, encoding_efficiency, resize_embeddings)

    zh = train_sentencepiece("zh.txt", "zh.model", vocab_size=20000)
    merged = merge_sentencepiece("llama2.model", zh, scores="rank", pad_to_multiple=128)
    export_hf_tokenizer(merged, "zh-llama-tokenizer")
    report = encoding_efficiency({"llama2": "llama2.model", "merged": merged}, {"zh": ["你好"]})
    print(report.table())
    new_ids = resize_embeddings(model, "llama2.model", merged)

Byte-level BPE tokenizers (Llama-3, Qwen2, SmolLM, ...) are extended by continued BPE
training instead: ``extend_bpe(base, texts, new_tokens=20000).save(out_dir)``.

Everything else works on SentencePiece ``ModelProto``s (paths, bytes or protos) and Hugging Face
tokenizers; nothing touches the network.
"""

from llamazh.tokenizer.bpe import BPE_SCOPES, BPEExtension, extend_bpe
from llamazh.tokenizer.efficiency import EfficiencyReport, encoding_efficiency
from llamazh.tokenizer.export import (
    build_fast_tokenizer,
    export_hf_tokenizer,
    save_tokenizer,
    tied_merge_pieces,
)
from llamazh.tokenizer.heldout import CJK_HEAVY, HeldOutSplit, chinese_held_out_split, cjk_share
from llamazh.tokenizer.merge import MergeResult, has_cjk, merge_sentencepiece
from llamazh.tokenizer.resize import RESIZE_INITS, resize_embeddings
from llamazh.tokenizer.train import TRAIN_DEFAULTS, train_sentencepiece

__all__ = [
    "BPE_SCOPES",
    "CJK_HEAVY",
    "RESIZE_INITS",
    "TRAIN_DEFAULTS",
    "BPEExtension",
    "EfficiencyReport",
    "HeldOutSplit",
    "MergeResult",
    "build_fast_tokenizer",
    "chinese_held_out_split",
    "cjk_share",
    "encoding_efficiency",
    "export_hf_tokenizer",
    "extend_bpe",
    "has_cjk",
    "merge_sentencepiece",
    "resize_embeddings",
    "save_tokenizer",
    "tied_merge_pieces",
    "train_sentencepiece",
]
