"""Checkpoint conversion: the command line over `clara_jax.clara.formats`.

    python -m clara_jax.convert hf-mistral --model_dir HF_DIR --out_dir CKPT [--dtype bfloat16]
        (any supported decoder: Mistral, Llama, Qwen2, Phi-3; docs/backbones.md)
    python -m clara_jax.convert verify-hf --model_dir HF_DIR [--checkpoint CKPT] [--tolerance 1e-4]
    python -m clara_jax.convert export-hf --checkpoint CKPT --out_dir HF_DIR [--dtype ...]
    python -m clara_jax.convert apple --clara_dir RELEASE --base_model_dir HF_DIR --out_dir DIR
    python -m clara_jax.convert export-apple --checkpoint CLARA_DIR_OR_WORKDIR --out_dir RELEASE \
        [--base_dir HF_BASE] [--training_stage stage1|stage1_2|stage2|...]
    python -m clara_jax.convert export-adapters --checkpoint CLARA_DIR_OR_WORKDIR --out_dir BUNDLE
    python -m clara_jax.convert import-adapters --adapters_dir BUNDLE --base_model_dir BASE \
        --out_dir CLARA_DIR
"""

import json
import os
import time

from absl import app, flags

from clara_jax.clara.formats import bundle
from clara_jax.clara.formats.hf_mistral import (convert_hf_to_checkpoint, load_checkpoint,
                                                save_hf_mistral)
from clara_jax.clara.model import Clara
from clara_jax.convert.adapters import export_trainable, import_trainable
from clara_jax.convert.verify import TOLERANCE, verify_hf

flags.DEFINE_string("model_dir", None, "Hugging Face decoder directory (config.json, "
                    "safetensors): Mistral, Llama, Qwen2 or Phi-3.")
flags.DEFINE_string("checkpoint", None, "Our checkpoint directory (or a saved Clara); for "
                    "verify-hf, a converted checkpoint of --model_dir to check instead of "
                    "reading --model_dir.")
flags.DEFINE_float("tolerance", TOLERANCE, "verify-hf: the largest max |logit difference| "
                   "that passes.")
flags.DEFINE_string("clara_dir", None, "Apple CLaRa release (config.json, adapters.pth, ...).")
flags.DEFINE_string("base_model_dir", None, "Base model directory under an Apple release or an "
                    "adapter bundle (HF Mistral, or for import-adapters also our checkpoint).")
flags.DEFINE_string("adapters_dir", None, "A bundle written by export-adapters.")
flags.DEFINE_string("out_dir", None, "Where to write.")
flags.DEFINE_string("base_dir", None, "export-apple: an existing Hugging Face base of the model "
                    "for config.json's decoder_model_name (default: an imported release's, or "
                    "the model's base written to OUT_DIR/base_model).")
flags.DEFINE_string("training_stage", None, "export-apple: Apple's training_stage in config.json "
                    "(default: an imported release's, else stage2 with a query reasoner, "
                    "stage1 without, so that from_pretrained loads every adapter).")
flags.DEFINE_string("dtype", None, "Cast weights to this dtype (float32, bfloat16, float16).")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty out_dir.")
FLAGS = flags.FLAGS
VERBS = ("hf-mistral", "verify-hf", "export-hf", "apple", "export-apple", "export-adapters",
         "import-adapters")


def _need(*names):
    missing = [n for n in names if not getattr(FLAGS, n)]
    if missing:
        raise app.UsageError(f"missing --{', --'.join(missing)}")


def main(argv):
    if len(argv) != 2 or argv[1] not in VERBS:
        raise app.UsageError(f"usage: python -m clara_jax.convert {{{'|'.join(VERBS)}}} ...")
    verb, t0 = argv[1], time.time()
    if verb == "hf-mistral":
        _need("model_dir", "out_dir")
        cfg = convert_hf_to_checkpoint(FLAGS.model_dir, FLAGS.out_dir, FLAGS.dtype,
                                       FLAGS.overwrite)
        print(f"{FLAGS.model_dir} -> {FLAGS.out_dir}: {cfg.num_params:,} parameters, "
              f"{cfg.param_dtype}, {time.time() - t0:.1f} s")
    elif verb == "verify-hf":
        _need("model_dir")
        parity = verify_hf(FLAGS.model_dir, FLAGS.checkpoint)
        ok = parity.max_abs_diff <= FLAGS.tolerance
        print(f"{FLAGS.checkpoint or FLAGS.model_dir} ({parity.architecture}) vs transformers "
              f"on {FLAGS.model_dir}: max |logit difference| {parity.max_abs_diff:.3g} over "
              f"{parity.num_sequences} sequences of {parity.length} tokens (float32), "
              f"{'within' if ok else 'ABOVE'} {FLAGS.tolerance:g}, {time.time() - t0:.1f} s")
        if not ok:
            raise SystemExit(1)
    elif verb == "export-hf":
        _need("checkpoint", "out_dir")
        cfg, params = load_checkpoint(FLAGS.checkpoint)
        save_hf_mistral(cfg, params, FLAGS.out_dir, FLAGS.dtype)
        print(f"{FLAGS.checkpoint} -> {FLAGS.out_dir} (HF safetensors), "
              f"{time.time() - t0:.1f} s")
    elif verb == "apple":
        _need("clara_dir", "base_model_dir", "out_dir")
        Clara.from_apple(FLAGS.clara_dir, FLAGS.base_model_dir, FLAGS.dtype).save(FLAGS.out_dir)
        print(f"{FLAGS.clara_dir} over {FLAGS.base_model_dir} -> {FLAGS.out_dir}, "
              f"{time.time() - t0:.1f} s")
    elif verb == "export-adapters":
        _need("checkpoint", "out_dir")
        export_trainable(FLAGS.checkpoint, FLAGS.out_dir)
        size = os.path.getsize(os.path.join(FLAGS.out_dir, bundle.TENSORS_FILE))
        print(f"{FLAGS.checkpoint} -> {FLAGS.out_dir} (adapters + added-token rows, "
              f"{size / 2**20:.1f} MiB), {time.time() - t0:.1f} s")
    elif verb == "import-adapters":
        _need("adapters_dir", "base_model_dir", "out_dir")
        import_trainable(FLAGS.adapters_dir, FLAGS.base_model_dir).save(FLAGS.out_dir)
        print(f"{FLAGS.adapters_dir} over {FLAGS.base_model_dir} -> {FLAGS.out_dir}, "
              f"{time.time() - t0:.1f} s")
    else:
        _need("checkpoint", "out_dir")
        Clara.load(FLAGS.checkpoint).export_apple(FLAGS.out_dir, FLAGS.base_dir,
                                                  FLAGS.training_stage)
        with open(os.path.join(FLAGS.out_dir, "config.json")) as f:
            written = json.load(f)
        print(f"{FLAGS.checkpoint} -> {FLAGS.out_dir} (Apple format, training_stage "
              f"{written['training_stage']}, decoder_model_name "
              f"{written['decoder_model_name']}), {time.time() - t0:.1f} s")


if __name__ == "__main__":
    app.run(main)
