# python -m clara_jax.train --config=configs/instruct.py:model=tiny --workdir=workdir/instruct
"""CLaRa stage `instruct` (Apple's stage1_2, scripts/train_instruction_tuning.sh);
`:model=tiny|mid|mistral_7b|llama3_2_1b|qwen2_5_1_5b|phi4_mini`."""

from configs import common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, model="tiny")
    # Official stage 1_2: a fresh decoder adapter over stage 1's encoder
    # (instruct.decoder_init), lr 1e-4 cosine, batch 128, max_len 2048, generation_top_k 5:
    # the common defaults.
    return common.base_config("instruct", a.model)
