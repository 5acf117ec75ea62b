# python -m clara_jax.train --config=configs/pretrain.py:model=tiny --workdir=workdir/pretrain
"""CLaRa stage `pretrain` (Apple's stage1, scripts/train_pretraining.sh);
`:model=tiny|mid|mistral_7b|llama3_2_1b|qwen2_5_1_5b|phi4_mini`."""

from configs import common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, model="tiny")
    c = common.base_config("pretrain", a.model)
    # The memory tokens' embedding rows train here, and only here: the official train_sft.py
    # builds stage 1 with optimize_mem_tokens=True, and later stages re-freeze them.
    c.optimize_mem_tokens = True
    # Official stage 1 otherwise: lr 1e-4 cosine, batch 128, max_len 2048, one document per
    # record (--generation_top_k 1): the common defaults.
    return c
