"""CLaRa settings shared by the model pieces: lengths, rates, special-token ids, loss weights."""

from __future__ import annotations

import dataclasses
from typing import Any

from clara_jax.model.lora import LoraConfig

STAGES = ("pretrain", "instruct", "end_to_end", "retrieval_pretrain")
# Apple's stage names (config.json `training_stage`, batch["stage"]) -> ours.
APPLE_STAGES = {"stage1": "pretrain", "stage1_2": "instruct", "stage2": "end_to_end",
                "stage2_pretrain_retrieval": "retrieval_pretrain"}
ADAPTERS = ("encoder", "decoder", "query_reasoner")
# What each stage trains (as in the official code). The encoder is frozen in stage 3.
TRAINABLE_ADAPTERS = {
    "pretrain": ("encoder", "decoder"),
    "instruct": ("encoder", "decoder"),
    "end_to_end": ("query_reasoner", "decoder"),
    "retrieval_pretrain": ("query_reasoner",),
}


@dataclasses.dataclass(frozen=True)
class ClaraConfig:
    """doc_max_length and compress_rate in tokens; n_mem = doc_max_length // compress_rate.

    `first_mem_token_id` is the id of `<MEM0>` (base vocabulary size: special tokens are
    appended after it); `temperature` is the top-k relaxation's and `retrieval_temperature`
    the InfoNCE one.
    """

    doc_max_length: int = 256
    compress_rate: int = 32
    generation_top_k: int = 5
    sep: bool = True
    different_mem_tokens: bool = True
    first_mem_token_id: int = 32000
    mse_weight: float = 0.1
    temperature: float = 0.02
    retrieval_temperature: float = 0.02
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        if self.compress_rate <= 0 or self.doc_max_length % self.compress_rate:
            raise ValueError(
                f"doc_max_length ({self.doc_max_length}) must be a positive multiple of "
                f"compress_rate ({self.compress_rate})")
        if self.generation_top_k <= 0:
            raise ValueError(f"generation_top_k must be positive, got {self.generation_top_k}")
        if self.temperature <= 0 or self.retrieval_temperature <= 0:
            raise ValueError("temperatures must be positive")

    @property
    def n_mem(self) -> int:
        return self.doc_max_length // self.compress_rate

    @property
    def num_added_tokens(self) -> int:
        """Memory tokens (n, or 1 shared) plus <AE>, <ENC>, <SEP>."""
        return (self.n_mem if self.different_mem_tokens else 1) + 3

    def replace(self, **changes: Any) -> "ClaraConfig":
        return dataclasses.replace(self, **changes)


def canonical_stage(stage: str) -> str:
    """Our stage name for ours or Apple's; ValueError naming the known ones otherwise."""
    stage = APPLE_STAGES.get(stage, stage)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {STAGES} "
                         f"(or Apple's {tuple(APPLE_STAGES)})")
    return stage
