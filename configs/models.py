# python -c "from configs import models; print(models.get_config('tiny'))"
"""Model presets as ml-collections ConfigDicts: `get_config("tiny" | "mid" | "mistral_7b" |
"llama3_2_1b" | "qwen2_5_1_5b" | "phi4_mini")`.

The presets themselves live in `clara_jax.model.config.PRESETS` (so installed code resolves a
preset name without this folder); this file is the command-line view of them, e.g.
`--config=configs/models.py:mistral_7b`.
"""

import ml_collections

from clara_jax.model.config import MistralConfig, preset


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(preset(arg).to_dict())


def to_model_config(cd: ml_collections.ConfigDict) -> MistralConfig:
    """Validated MistralConfig from a ConfigDict (unknown or invalid fields raise, naming them)."""
    return MistralConfig.from_dict(cd.to_dict())
