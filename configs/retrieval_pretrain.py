# python -m clara_jax.train --config=configs/retrieval_pretrain.py:model=tiny --workdir=workdir/retrieval_pretrain
"""CLaRa stage `retrieval_pretrain`;
`:model=tiny|mid|mistral_7b|llama3_2_1b|qwen2_5_1_5b|phi4_mini`."""

from configs import common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, model="tiny")
    return common.base_config("retrieval_pretrain", a.model)
