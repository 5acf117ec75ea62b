# python -m clara_jax.train --config=configs/pretrain.py:model=tiny --workdir=workdir/pretrain
"""CLaRa stage `pretrain`; `:model=tiny|mid|mistral_7b`."""

from configs import common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, model="tiny")
    return common.base_config("pretrain", a.model)
