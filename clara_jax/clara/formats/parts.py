"""`ClaraParts`: what every CLaRa checkpoint format reads into and writes from.

A plain record of arrays and configs, no behaviour: the formats (`ours`, `apple`, `bundle`)
sit below the `Clara` facade in the import graph, so they exchange this, not a `Clara`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.tokenizer import ClaraTokenizer
from clara_jax.model.config import MistralConfig

TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass
class ClaraParts:
    """model_config: the base with the resized vocabulary; params: base tree (embedding and
    lm_head include the added tokens' rows); adapters: {name: LoRA tree}; tokenizer_path: the
    sentencepiece file the tokenizer was read from (copied on save); apple_config: Apple's
    config.json fields we do not model (kept for export)."""

    model_config: MistralConfig
    config: ClaraConfig
    params: dict
    adapters: dict[str, dict]
    tokenizer: ClaraTokenizer
    tokenizer_path: str | None = None
    apple_config: dict = dataclasses.field(default_factory=dict)


def to_device(tree):
    """Every leaf as a jax array (on the default device)."""
    return jax.tree_util.tree_map(jnp.asarray, tree)


def host_copy(parts: ClaraParts) -> ClaraParts:
    """`parts` with params and adapters fetched to host memory (numpy)."""
    return dataclasses.replace(parts, params=jax.device_get(parts.params),
                               adapters=jax.device_get(parts.adapters))
