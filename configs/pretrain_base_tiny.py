# python -m clara_jax.train --config=configs/pretrain_base_tiny.py --workdir=workdir/base
"""Pretrain a tiny Mistral base LM from scratch on the synthetic corpus's plain text (CPU),
so the CLaRa stages have a base model that can read without any download."""

import ml_collections

from configs import common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, model="tiny", steps=1500)
    c = common.base_config("base_lm", a.model)
    c.total_steps = a.steps
    c.batch_size = 32
    c.learning_rate = 3e-3
    c.max_len = 128
    c.vocab_size = 1024        # sentencepiece model trained on the synthetic text
    # A file of words (whitespace separated) the tokenizer keeps as single pieces; empty: none.
    c.whole_words = ""
    # "embedding": lm_head starts as the transpose of the token embedding, so that copying a
    # context token into the answer needs only an attention map (the base learns to read in
    # a few hundred steps); "random": the usual independent init.
    c.lm_head_init = "embedding"
    # RoPE base period; None: the preset's (1e6, Mistral's). 1e4 turns the 32-dim heads'
    # rotations fast enough to tell neighbouring tokens apart, which reading "the word after
    # 'born in'" needs.
    c.rope_theta = ml_collections.config_dict.placeholder(float)
    return c
