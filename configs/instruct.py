# python -m clara_jax.train --config=configs/instruct.py:model=tiny --workdir=workdir/instruct
"""CLaRa stage `instruct`; `:model=tiny|mid|mistral_7b`."""

from configs import common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, model="tiny")
    return common.base_config("instruct", a.model)
