"""python -m clara_jax.train --config=configs/<stage>.py[:arg] --workdir=DIR [--config.x=y]"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from clara_jax import cpu_malloc
from clara_jax.train.train import train

config_flags.DEFINE_config_file("config", None, "Stage config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, TensorBoard, exported model.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (TPU pods, "
                  "Slurm): every host runs this command; each feeds its shard of the batch.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.multihost:   # before anything touches a backend
        jax.distributed.initialize()
    cpu_malloc.warn_if_unset(jax.default_backend())
    print(train(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
    app.run(main)
