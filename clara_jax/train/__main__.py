"""python -m clara_jax.train --config=configs/<stage>.py[:arg] --workdir=DIR [--config.x=y]
[--verbose]

Ends with one line on stderr and an exit status naming the kind of failure (0 done, 2 bad
config or data, 3 storage, 4 diverged, 75 preempted: rerun to resume; `clara_jax.errors`);
`--verbose` adds the traceback and the libraries' logs (absl, Orbax)."""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from clara_jax import cpu_malloc, errors
from clara_jax.train.train import train

config_flags.DEFINE_config_file("config", None, "Stage config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, TensorBoard, exported model.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (TPU pods, "
                  "Slurm): every host runs this command; each feeds its shard of the batch.")
flags.DEFINE_bool("verbose", False, "On failure print the traceback; show the libraries' "
                  "logs (absl, Orbax).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def run() -> None:
    if FLAGS.multihost:   # before anything touches a backend
        jax.distributed.initialize()
    cpu_malloc.warn_if_unset(jax.default_backend())
    print(train(FLAGS.config, FLAGS.workdir))


def main(argv) -> int:
    del argv
    # absl logs (Orbax's among them): all with --verbose, else none (failures end in one line)
    logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.FATAL)
    return errors.run_command(run, "train", FLAGS.verbose)


if __name__ == "__main__":
    app.run(main, flags_parser=errors.flags_parser("train"))
