"""Training wrappers for plain PyTorch loops: LoRA plus trainable embeddings, PEFT-format
adapters, shard-by-shard merging, data helpers.

Example:
    >>> from llamazh.training import prepare_for_training, save_adapter
    >>> prepared = prepare_for_training(model, embeddings="new_rows", lm_head="new_rows",
    ...                                 new_token_ids=new_ids)
    >>> optimizer = torch.optim.AdamW(prepared.param_groups(2e-4))
    >>> ...  # train
    >>> save_adapter(prepared, "out/adapter")
"""

from llamazh.training.adapter_load import load_adapter
from llamazh.training.adapters import save_adapter
from llamazh.training.align import AlignmentReport, align_embeddings
from llamazh.training.config import AdapterConfig
from llamazh.training.data import (
    CausalLMCollator,
    causal_lm_loss,
    group_into_blocks,
    pack_sequences,
)
from llamazh.training.embeddings import RowsEmbedding, RowsLinear
from llamazh.training.lora import LoRALinear
from llamazh.training.merge import merge_adapters
from llamazh.training.output_share import OutputShareReport, share_output_rows
from llamazh.training.prepare import prepare_for_training
from llamazh.training.prepared import PreparedModel, TrainableReport

__all__ = [
    "AdapterConfig",
    "AlignmentReport",
    "CausalLMCollator",
    "LoRALinear",
    "OutputShareReport",
    "PreparedModel",
    "RowsEmbedding",
    "RowsLinear",
    "TrainableReport",
    "align_embeddings",
    "causal_lm_loss",
    "group_into_blocks",
    "load_adapter",
    "merge_adapters",
    "pack_sequences",
    "prepare_for_training",
    "save_adapter",
    "share_output_rows",
]
