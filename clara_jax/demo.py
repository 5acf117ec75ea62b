"""`make demo`: the main job on its embedded default, on CPU.

Today it exercises the decoder foundation end to end: a tiny random Mistral is written in
Hugging Face format, imported into our checkpoint format (`python -m clara_jax.convert`),
loaded back, checked for a lossless round trip, and used for a forward pass and a greedy
KV-cache decode. The full three-stage CLaRa run replaces this as those stages land.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

flags.DEFINE_string("workdir", "workdir/demo", "Where the demo writes its files.")
flags.DEFINE_integer("seed", 0, "Random seed.")
FLAGS = flags.FLAGS


def run(workdir: str, seed: int = 0) -> dict:
    """Runs the demo; returns a summary dict (also printed)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from clara_jax.convert import hf_mistral
    from clara_jax.model import decode
    from clara_jax.model.config import preset
    from clara_jax.model.mistral import Mistral, init_params

    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(seed))
    hf_dir = os.path.join(workdir, "hf_tiny")
    ckpt_dir = os.path.join(workdir, "ckpt_tiny")
    hf_mistral.save_hf_mistral(cfg, jax.device_get(params), hf_dir)
    hf_mistral.convert_hf_to_checkpoint(hf_dir, ckpt_dir, overwrite=True)
    cfg2, params2 = hf_mistral.load_checkpoint(ckpt_dir)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)))
    if not same:
        raise RuntimeError("HF export -> import round trip changed the parameters")

    model = Mistral(cfg2)
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, cfg2.vocab_size, size=(2, 16))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    out = jax.jit(model.apply)({"params": params2}, jnp.asarray(ids),
                               attention_mask=jnp.asarray(mask))
    gen = decode.generate(model, {"params": params2}, input_ids=jnp.asarray(ids),
                          attention_mask=jnp.asarray(mask), max_new_tokens=16,
                          eos_id=cfg2.eos_token_id, pad_id=0)
    summary = {
        "model": "tiny", "params": cfg2.num_params, "round_trip_identical": same,
        "logits_shape": list(out.logits.shape), "generated": np.asarray(gen.tokens).tolist(),
        "seconds": round(time.time() - t0, 1),
    }
    print(f"tiny Mistral ({cfg2.num_params:,} parameters) exported to {hf_dir}, "
          f"imported to {ckpt_dir}: round trip identical = {same}")
    print(f"forward logits {tuple(out.logits.shape)}; greedy decode of 16 tokens:")
    for row in summary["generated"]:
        print("  ", row)
    print(f"demo finished in {summary['seconds']} s")
    return summary


def main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    run(FLAGS.workdir, FLAGS.seed)


if __name__ == "__main__":
    app.run(main)
