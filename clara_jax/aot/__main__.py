"""python -m clara_jax.aot --config=configs/<stage>.py[:arg] --topology=v5e:16x16|local
[--decode] [--hbm_gib=G] [--report_json=PATH] [--serialize=PATH] [--correct_scan_cost]"""

from __future__ import annotations

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from clara_jax.aot.report import compile_report, format_report
from clara_jax.aot.topology import LOCAL


def cli() -> None:
    """Defines the flags and runs `main` (absl)."""
    config_flags.DEFINE_config_file("config", None, "Stage config file (configs/*.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "Target TPU topology: v4:AxBxC, v5e:AxB, v5p:AxBxC, "
                        "v6e:AxB (chips per dimension), e.g. v5e:16x16 = v5e-256; or 'local': "
                        "this process's devices, as `python -m clara_jax.train` would run.")
    flags.DEFINE_bool("decode", False, "Compile the one-token KV-cache decode step (batch "
                      "config.batch_size, cache of config.max_len tokens) instead of training.")
    flags.DEFINE_float("hbm_gib", None, "Override the chip's HBM (GiB) for the fit verdict.")
    flags.DEFINE_string("report_json", None, "Also write the report as JSON here.")
    flags.DEFINE_string("serialize", None, "Write the compiled executable and its fingerprint "
                        "here, for `python -m clara_jax.train --config.compiled_step=PATH`.")
    flags.DEFINE_bool("correct_scan_cost", True, "One more (2-layer, unrolled) compile so "
                      "FLOPs and bytes count every scanned layer (XLA counts a loop body once).")
    flags.mark_flags_as_required(["config", "topology"])
    FLAGS = flags.FLAGS

    def main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)
        if FLAGS.topology != LOCAL and jax.config.jax_platforms is None:
            # The host's own backend stays CPU: compiling for a topology needs no local TPU
            # (and must not grab one a trainer on this machine is using).
            jax.config.update("jax_platforms", "cpu")
        report, compiled = compile_report(FLAGS.config, FLAGS.topology, decode=FLAGS.decode,
                                          hbm_gib=FLAGS.hbm_gib,
                                          correct_scan_cost=FLAGS.correct_scan_cost,
                                          serialize_to=FLAGS.serialize)
        print(format_report(report))
        if FLAGS.report_json:
            with open(FLAGS.report_json, "w") as f:
                json.dump(report, f, indent=2)
            print(f"report: {FLAGS.report_json}")
        if "executable" in report:
            use = (f"; train with --config.compiled_step={report['executable']}"
                   if report["mode"] == "train" else "")
            print(f"executable: {report['executable']} ({report['executable_bytes']} bytes)"
                  + use)

    app.run(main)


if __name__ == "__main__":
    cli()
