"""The base-LM trainer (stage `base_lm`): next-token training of every weight of a base on
packed text, exported as a converted-style base (`init_from` of a CLaRa stage). Its step is
`step.make_base_lm_step`; the loop is `train.train`'s."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clara_jax.clara.tokenizer import ClaraTokenizer
from clara_jax.clara.formats.hf_mistral import save_checkpoint
from clara_jax.data import pipeline
from clara_jax.errors import UserError
from clara_jax.model.config import MistralConfig
from clara_jax.train.inputs import Data, text_records
from clara_jax.train.step import TrainState


def init_state(params: dict, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state training every base weight: trainable = {"base": params}, no frozen
    base or adapters (also under `jax.eval_shape`)."""
    return TrainState(step=jnp.zeros((), jnp.int32), base={}, trainable={"base": params},
                      frozen={}, opt_state=tx.init({"base": params}), rng=rng)


def text_data(c: ml_collections.ConfigDict, files: dict[str, str], tok: ClaraTokenizer
              ) -> Data:
    """The run's texts packed into rows of max_len tokens (`pipeline.pack_text`); the first
    1/20 (at least one batch) held out for eval. Datasets of this host's shard."""
    shard_index, shard_count = pipeline.host_shard()
    local_bs = c.batch_size // shard_count
    texts, prompts = text_records(c, files)
    rows = pipeline.pack_text(texts, tok, c.max_len, prompts)
    n_eval = max(len(rows) // 20, local_bs)
    if len(rows) - n_eval < local_bs * shard_count:
        raise UserError(f"config.data.train_files: {files['text']} packs into {len(rows)} rows "
                        f"of max_len {c.max_len} tokens, fewer than one train batch of "
                        f"{c.batch_size} beside the {n_eval} held out for eval")
    train_ds = pipeline.text_dataset(rows[n_eval:], batch_size=local_bs, seed=c.seed,
                                     pad_id=tok.pad_id, shard_index=shard_index,
                                     shard_count=shard_count)
    eval_ds = pipeline.text_dataset(rows[:n_eval], batch_size=local_bs, shuffle=False,
                                    pad_id=tok.pad_id, num_epochs=1, shard_index=shard_index,
                                    shard_count=shard_count)
    return Data(train_ds, eval_ds, len(rows))


def export(workdir: str, model_cfg: MistralConfig, state: TrainState,
           tokenizer_path: str) -> str:
    """Writes the trained base to `{workdir}/model` (weights, model_config.json, tokenizer);
    returns that directory."""
    out = os.path.join(workdir, "model")
    save_checkpoint(out, model_cfg, jax.device_get(state.trainable["base"]), tokenizer_path)
    return out
