"""Evaluates a saved Clara on an `eval` JSONL file (thin CLI over `clara_jax.eval.evaluate`).

    python -m clara_jax.evaluate --checkpoint DIR --data eval.jsonl \\
        [--stage stage1|stage1_2|stage2] [--setting first|gold|normal|oracle] \\
        --mode compressed|full_text|closed_book|all [--top_k 5] [--out_dir DIR] [--limit N]

--stage takes the official evaluation of that stage (`eval.evaluate.OFFICIAL`: stage1 /
stage1_2: the first 5 documents in file order, 128 new tokens; stage2: the query reasoner's
top 5, 64 new tokens); --setting, --top_k and --max_new_tokens given explicitly override it.
Without --stage: setting normal, top_k 5, the setting's official max_new_tokens.

DIR is a directory written by `Clara.save` or a training work directory. Writes
`predictions.jsonl` and `summary.json` to out_dir (with --mode all: one sub-directory per mode
plus a combined `summary.json`) and prints a Markdown table.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from clara_jax import errors

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Saved Clara directory or training work directory.")
flags.DEFINE_string("data", None, "Eval JSONL file(s) (comma-separated paths or globs).")
flags.DEFINE_enum("stage", None, ["stage1", "stage1_2", "stage2", "pretrain", "instruct",
                                  "end_to_end"],
                  "The official evaluation of this stage (setting, top_k, max_new_tokens); "
                  "explicit flags override it.")
flags.DEFINE_enum("setting", None, ["first", "gold", "normal", "oracle"],
                  "first: the first top_k documents in file order (official stage1/stage1_2); "
                  "gold: first with the gold documents guaranteed; normal: query-reasoner "
                  "top_k (official stage2); oracle: normal with the gold documents guaranteed. "
                  "Default: --stage's, else normal.")
flags.DEFINE_enum("mode", "compressed", ["compressed", "full_text", "closed_book", "all"],
                  "What the generator reads; `all` runs the three modes.")
flags.DEFINE_integer("top_k", None, "Documents given to the generator (default 5).")
flags.DEFINE_string("out_dir", None, "Output directory (default: {checkpoint}/eval_{setting}).")
flags.DEFINE_integer("limit", None, "Evaluate only the first N records.")
flags.DEFINE_integer("batch_size", 16, "Records per generation batch.")
flags.DEFINE_integer("max_new_tokens", None, "Greedy tokens per answer (default: the "
                     "setting's official value, 128 for first / gold, 64 for normal / oracle).")
flags.DEFINE_string("adapter", "decoder", "Generator adapter; `none` = the base model alone.")
flags.DEFINE_bool("verbose", False, "On failure print the traceback; show the libraries' logs "
                  "(absl).")


def run(checkpoint: str, data: str, *, setting: str | None = None, mode: str = "compressed",
        top_k: int | None = None, out_dir: str | None = None, limit: int | None = None,
        batch_size: int = 16, max_new_tokens: int | None = None,
        adapter: str | None = "decoder", stage: str | None = None) -> dict[str, dict]:
    """Loads the model and data, evaluates each mode, writes the files; returns
    {mode: summary}. stage: the official evaluation of that stage
    for whichever of setting / top_k / max_new_tokens is None (`eval.evaluate.resolve_settings`);
    without it setting normal, top_k 5 and the setting's official max_new_tokens."""
    from clara_jax.clara.model import Clara
    from clara_jax.data.formats import read_jsonl
    from clara_jax.eval.evaluate import MODES, evaluate, format_table, resolve_settings

    chosen = resolve_settings(stage, setting, top_k, max_new_tokens)
    setting, top_k, max_new_tokens = (chosen["setting"], chosen["top_k"],
                                      chosen["max_new_tokens"])
    records, _ = read_jsonl(data, "eval")
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        records = records[:limit]
    model = Clara.load(checkpoint)
    out_dir = out_dir or os.path.join(checkpoint, f"eval_{setting}")
    modes = MODES if mode == "all" else (mode,)
    summaries = {}
    for m in modes:
        summary, preds = evaluate(model, records, mode=m, setting=setting, top_k=top_k,
                                  batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  adapter=adapter)
        summary["data"], summary["checkpoint"], summary["stage"] = data, checkpoint, stage
        target = os.path.join(out_dir, m) if mode == "all" else out_dir
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "predictions.jsonl"), "w", encoding="utf-8") as f:
            for p in preds:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        with open(os.path.join(target, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        summaries[m] = summary
    if mode == "all":
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summaries, f, indent=2, sort_keys=True)
    print(format_table(summaries))
    print(f"wrote {out_dir}")
    return summaries


def main(argv) -> int:
    del argv
    # absl logs (Orbax's among them): all with --verbose, else none (failures end in one line)
    logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.FATAL)
    return errors.run_command(evaluate_from_flags, "evaluate", FLAGS.verbose)


def evaluate_from_flags() -> dict[str, dict]:
    """`run` with the command line's flags."""
    return run(FLAGS.checkpoint, FLAGS.data, setting=FLAGS.setting, mode=FLAGS.mode,
               top_k=FLAGS.top_k, out_dir=FLAGS.out_dir, limit=FLAGS.limit,
               batch_size=FLAGS.batch_size, max_new_tokens=FLAGS.max_new_tokens,
               adapter=None if FLAGS.adapter.lower() == "none" else FLAGS.adapter,
               stage=FLAGS.stage)


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "data"])
    app.run(main, flags_parser=errors.flags_parser("evaluate"))
