"""python -m clara_jax.train.sweep_table --workdir=DIR

Tabulates a sweep directory's runs (`DIR/rate_*`, see `clara_jax.train.sweep`): prints the
Markdown table and writes `DIR/sweep_table.md` and `DIR/sweep_table.json`.
"""

from absl import app, flags

from clara_jax.train.sweep import write_table

flags.DEFINE_string("workdir", None, "Sweep directory (holding rate_{r} run directories).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    print(write_table(FLAGS.workdir)["markdown"])


if __name__ == "__main__":
    app.run(main)
