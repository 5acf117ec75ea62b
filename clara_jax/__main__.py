"""`python -m clara_jax <verb> [flags]`: one entry point for every command.

    python -m clara_jax --help               the verbs
    python -m clara_jax train --config=configs/pretrain.py:model=tiny --workdir=...
    python -m clara_jax <verb> --help        a verb's own flags

Each verb runs its module as `python -m <module>` would (the module paths still work).
"""

from __future__ import annotations

import runpy
import sys

# verb -> (module run as __main__, what it does)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("clara_jax.train", "train a stage (or the base LM) from a config file"),
    "evaluate": ("clara_jax.evaluate", "EM / F1 / accuracy and Recall@k of a model on eval JSONL"),
    "answer": ("clara_jax.answer", "retrieve in the compressed space and answer a question"),
    "compress_corpus": ("clara_jax.compress_corpus", "compress a corpus once into an index"),
    "convert": ("clara_jax.convert", "import / export checkpoints (HF, Apple, adapter bundles)"),
    "aot": ("clara_jax.aot", "compile a train / decode step for a TPU topology, report fit"),
    "demo": ("clara_jax.demo", "`make demo`: CLaRa end to end on CPU on synthetic worlds"),
    "sweep": ("clara_jax.train.sweep", "one stage at several compression rates"),
    "sweep_table": ("clara_jax.train.sweep_table", "the table of a sweep"),
    "synthetic": ("clara_jax.data.synthetic", "write a synthetic world in every data format"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: python -m clara_jax <verb> [flags]   (python -m clara_jax <verb> --help)",
             "", "verbs:"]
    lines += [f"  {verb:<{width}}  {what}" for verb, (_, what) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb = argv[1]
    if verb not in VERBS:
        print(f"python -m clara_jax: unknown verb {verb!r}; known: {', '.join(VERBS)}",
              file=sys.stderr)
        return 2
    module = VERBS[verb][0]
    sys.argv = [f"python -m clara_jax {verb}"] + argv[2:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
