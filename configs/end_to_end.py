# python -m clara_jax.train --config=configs/end_to_end.py:model=tiny --workdir=workdir/end_to_end
"""CLaRa stage `end_to_end`; `:model=tiny|mid|mistral_7b`."""

from configs import common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, model="tiny")
    return common.base_config("end_to_end", a.model)
