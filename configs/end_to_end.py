# python -m clara_jax.train --config=configs/end_to_end.py:model=tiny --workdir=workdir/end_to_end
"""CLaRa stage `end_to_end` (Apple's stage2, scripts/train_stage_end_to_end.sh);
`:model=tiny|mid|mistral_7b|llama3_2_1b|qwen2_5_1_5b|phi4_mini`."""

from configs import common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, model="tiny")
    c = common.base_config("end_to_end", a.model)
    # The query reasoner starts as a copy of the encoder (end_to_end.query_reasoner_init).
    if a.model != "tiny":
        # Official stage 2: --learning_rate 5e-6 --lr_scheduler constant
        # --train_batch_size 32 --max_len 1024. The tiny model keeps the common tiny values
        # (its tests and the demo are tuned to them).
        c.learning_rate = 5e-6
        c.lr_schedule = "constant"
        c.batch_size = 32
        c.max_len = 1024
    return c
