"""python -m clara_jax.train --config=configs/<stage>.py[:arg] --workdir=DIR [--config.x=y]"""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Stage config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, TensorBoard, exported model.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (TPU pods, "
                  "Slurm): every host runs this command; each feeds its shard of the batch.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    if FLAGS.multihost:
        import jax
        jax.distributed.initialize()
    import jax
    from clara_jax import cpu_malloc
    cpu_malloc.warn_if_unset(jax.default_backend())
    from clara_jax.train.train import train
    summary = train(FLAGS.config, FLAGS.workdir)
    print(summary)


if __name__ == "__main__":
    app.run(main)
