"""Answer a question from a compressed corpus: retrieve with the query reasoner, generate.

    python -m clara_jax.answer --checkpoint DIR (--index INDEX | --docs FILE) \
        --question "..." [--k 5] [--max_new_tokens 64]

--index is a directory built by `python -m clara_jax.compress_corpus`; --docs is a JSONL of
{"id", "text"} or a .txt of one document per line, compressed on the fly (the rules for
both: docs/data.md, "Corpus files").

A failure ends in one line on stderr and an exit status (2: a bad flag or input line, named
file:line; see clara_jax.errors); --verbose adds the traceback and the libraries' INFO logs.
"""

from __future__ import annotations

import tempfile

from absl import app, flags, logging

from clara_jax.errors import run_command

flags.DEFINE_string("checkpoint", None, "A saved Clara directory or a training work directory.")
flags.DEFINE_string("index", None, "Index directory (python -m clara_jax.compress_corpus).")
flags.DEFINE_string("docs", None, "Documents to compress on the fly (.jsonl or .txt).")
flags.DEFINE_string("question", None, "The question.")
flags.DEFINE_integer("k", 5, "Documents retrieved and given to the generator.")
flags.DEFINE_integer("max_new_tokens", 64, "Answer length limit (tokens).")
flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logs, and a failure's "
                  "traceback.")
flags.mark_flags_as_required(["checkpoint", "question"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS.verbose:
        logging.set_verbosity(logging.WARNING)
    return run_command(answer_question, "answer", FLAGS.verbose)


def answer_question() -> None:
    """The command, with the flags parsed."""
    from clara_jax.clara.model import Clara
    from clara_jax.infer.answer import answer, format_answer
    from clara_jax.infer.index import build_index, open_index

    if (FLAGS.index is None) == (FLAGS.docs is None):
        raise app.UsageError("give exactly one of --index and --docs")
    model = Clara.load(FLAGS.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        if FLAGS.index:
            index = open_index(FLAGS.index, model)
        else:
            index = build_index(model, FLAGS.docs, tmp, batch_size=model.batch_size,
                                progress=False)
        result = answer(model, index, [FLAGS.question], FLAGS.k, FLAGS.max_new_tokens)[0]
    print(format_answer(result))


if __name__ == "__main__":
    app.run(main)
