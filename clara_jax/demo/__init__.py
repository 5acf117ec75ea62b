"""`make demo`: CLaRa end to end on CPU, on synthetic worlds (config: configs/demo.py).

    python -m clara_jax.demo --workdir=workdir/demo [--config.rates=4,16,32 ...]
    python -m clara_jax.demo --only=base --config.base.shipped= --workdir=DIR \
        [--export_base=clara_jax/demo_base]        # (re)make the shipped base

1. generate synthetic worlds of invented entities (list names, plain documents), each split
   into train and held-out entities; the held-out questions of the first `eval_worlds` are
   the evaluation set;
2. the base: the one shipped in `clara_jax/demo_base` (when the config asks for the base it
   describes), else a tiny Mistral trained here on reading lessons about worlds of its own;
3. at each compression rate: stage 1 (pretrain, SCP), stage 2 (instruct), stage 3
   (end_to_end), each with `clara_jax.train` from the previous stage's model, the rates in
   concurrent processes;
4. evaluate on the held-out entities: closed book and full text on the base, compressed
   documents in the normal and oracle settings, Recall@1/@5 before and after stage 3;
5. write `results.md`, `results.json` and `f1_vs_rate.png`, print the table (and EM by
   question kind) and every claim's paired margin (`check`), and exit 1 unless the claims of
   `config.check.gate` hold.

Every step is resumable: rerunning skips finished stages and resumes unfinished ones.

Modules, in the order of a run: `worlds` (data), `base` (the shipped base and its recipe),
`stages` (training), `report` (evaluation, tables, plot), `check` (the claims), `run` (the
whole demo) and `__main__` (the command line).
"""

from clara_jax.demo.base import (BASE_FIELDS, SHIPPED_BASE, base_recipe, export_base,
                                 shipped_base)
from clara_jax.demo.check import CLAIM_GROUPS, check, paired_margin
from clara_jax.demo.report import (Table, base_as_clara, evaluate_base, evaluate_models,
                                   format_results, kind_table, plot, read_eval_records)
from clara_jax.demo.run import parse_rates, prepare, run
from clara_jax.demo.stages import (BASE_TRAINER_FIELDS, CLARA_STAGES, CONFIG_DIR, STAGE_FILES,
                                   cpu_groups, run_stage, stage_config, train_rate,
                                   train_rates_in_parallel)
from clara_jax.demo.worlds import (make_worlds, write_base_text, write_eval_file,
                                   write_whole_words)

__all__ = ["BASE_FIELDS", "SHIPPED_BASE", "base_recipe", "export_base", "shipped_base",
           "CLAIM_GROUPS", "check", "paired_margin", "Table", "base_as_clara", "evaluate_base",
           "evaluate_models", "format_results", "kind_table", "plot", "read_eval_records",
           "parse_rates", "prepare", "run", "BASE_TRAINER_FIELDS", "CLARA_STAGES",
           "CONFIG_DIR", "STAGE_FILES", "cpu_groups", "run_stage", "stage_config",
           "train_rate", "train_rates_in_parallel", "make_worlds", "write_base_text",
           "write_eval_file", "write_whole_words"]
