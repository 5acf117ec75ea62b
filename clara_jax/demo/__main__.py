"""`python -m clara_jax.demo`: the command line of the demo (see the package docstring)."""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from clara_jax import cpu_malloc, errors
from clara_jax.demo.base import shipped_base
from clara_jax.demo.run import run
from clara_jax.demo.stages import CONFIG_DIR, train_rate
from clara_jax.demo.worlds import make_worlds

config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, "demo.py"),
                                "Demo config (configs/demo.py).", lock_config=True)
flags.DEFINE_string("workdir", "workdir/demo", "Where the demo writes everything.")
flags.DEFINE_enum("only", "", ["", "base"], "'base': make the worlds, train the base LM and "
                  "report how well it reads (closed book, full text); nothing else.")
flags.DEFINE_string("export_base", "", "With --only=base: copy the trained base and its "
                    "recipe to this directory (clara_jax/demo_base is the shipped one).")
flags.DEFINE_integer("train_rate", 0, "Internal: train only this rate's stages 1-3 (one "
                     "process of the parallel run), with --resolved_config.")
flags.DEFINE_string("resolved_config", "", "Internal: the demo config as JSON (with "
                    "--train_rate).")
flags.DEFINE_bool("verbose", False, "On failure print the traceback; show the libraries' "
                  "logs (absl, Orbax).")
flags.DEFINE_string("cpus", "", "Internal: CPUs to pin the --train_rate process to (0,1,...).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    del argv
    # absl logs (Orbax's among them): all with --verbose, else none (failures end in one line)
    logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.FATAL)
    return errors.run_command(demo, "demo", FLAGS.verbose)


def demo() -> None:
    """The demo (or with --train_rate one rate's stages); exits 1 when its check fails."""
    if FLAGS.train_rate:   # one rate's stages, in a process of train_rates_in_parallel
        if FLAGS.cpus:     # before JAX creates its CPU client, which sizes its thread pool
            os.sched_setaffinity(0, [int(c) for c in FLAGS.cpus.split(",")])
        cfg = ml_collections.ConfigDict(json.load(open(FLAGS.resolved_config)))
        base = shipped_base(cfg) or json.load(open(os.path.join(
            FLAGS.workdir, "base", "summary.json")))["model_dir"]
        train_rate(cfg, make_worlds(cfg, FLAGS.workdir, ("clara",)), FLAGS.train_rate, base,
                   FLAGS.workdir)
        return
    cpu_malloc.warn_if_unset(jax.default_backend())
    if FLAGS.export_base and FLAGS.only != "base":
        raise app.UsageError("--export_base needs --only=base")
    out = run(FLAGS.config, FLAGS.workdir, only_base=FLAGS.only == "base",
              export_base_to=FLAGS.export_base)
    if out["failures"]:
        print(f"DEMO CHECK FAILED ({len(out['failures'])} of {len(out['report'])} claims):\n  "
              + "\n  ".join(out["failures"]))
        sys.exit(1)
    if out["report"]:
        missed = [line for line in out["report"] if line.startswith("MISS")]
        print(f"demo check passed: the claims of {FLAGS.config.check.gate} hold, each by at "
              f"least {FLAGS.config.check.min_sigmas} standard errors" +
              (f"; {len(missed)} target(s) of other groups not met (MISS above)"
               if missed else ""))


if __name__ == "__main__":
    app.run(main, flags_parser=errors.flags_parser("demo"))
