"""Compress a corpus once into a resumable on-disk index (see `clara_jax.infer.index`).

    python -m clara_jax.compress_corpus --checkpoint DIR --input docs.jsonl --out_dir INDEX \
        [--batch_size 64] [--chunk_size 4096] [--dtype float32]

docs.jsonl holds {"id": str, "text": str} rows (a .txt file: one document per line). A rerun
into the same --out_dir continues after the last complete chunk; a different input or
checkpoint is refused.

On a pod, run the same command on every host with --distributed (`jax.distributed.initialize()`,
which finds the other hosts on TPU VMs): host h compresses chunks h, h + hosts, ... on its own
devices into --out_dir (a file system every host sees) and host 0 writes meta.json once all
are done. Without jax.distributed, --host_index / --host_count split the work by hand (for
example an array job of CPU machines); the last host to finish completes the index.

A failure ends in one line on stderr and an exit status (2: a bad flag or input line, named
file:line; 3: storage; see clara_jax.errors); --verbose adds the traceback and the libraries'
INFO logs. The input is read whole and checked before --out_dir is created or written.
"""

from absl import app, flags, logging

from clara_jax.errors import run_command

flags.DEFINE_string("checkpoint", None, "A saved Clara directory or a training work directory.")
flags.DEFINE_string("input", None, "JSONL of {\"id\", \"text\"} (or .txt, one doc per line).")
flags.DEFINE_string("out_dir", None, "Index directory (created; resumed if partial).")
flags.DEFINE_integer("batch_size", 64, "Documents per encoder batch.")
flags.DEFINE_integer("chunk_size", 4096, "Documents per stored chunk.")
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Stored state dtype.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host).")
flags.DEFINE_integer("host_index", None, "This host's share (with --host_count); default: "
                     "jax.process_index().")
flags.DEFINE_integer("host_count", None, "Number of hosts sharing the build; default: "
                     "jax.process_count().")
flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logs, and a failure's "
                  "traceback.")
flags.mark_flags_as_required(["checkpoint", "input", "out_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS.verbose:
        logging.set_verbosity(logging.WARNING)
    return run_command(compress_corpus, "compress_corpus", FLAGS.verbose)


def compress_corpus() -> None:
    """The command, with the flags parsed."""
    import jax

    if (FLAGS.host_index is None) != (FLAGS.host_count is None):
        raise app.UsageError("give both --host_index and --host_count, or neither")
    if FLAGS.distributed:
        jax.distributed.initialize()
    from clara_jax.clara.model import Clara
    from clara_jax.infer.index import build_index

    model = Clara.load(FLAGS.checkpoint)
    host = None if FLAGS.host_count is None else (FLAGS.host_index, FLAGS.host_count)
    index = build_index(model, FLAGS.input, FLAGS.out_dir, batch_size=FLAGS.batch_size,
                        chunk_size=FLAGS.chunk_size, dtype=FLAGS.dtype, host=host)
    if index is None:
        print(f"{FLAGS.out_dir}: this host's chunks are written; the index is complete once "
              f"every host has run")
        return
    print(f"{FLAGS.out_dir}: {len(index)} documents in {index.num_chunks} chunks, "
          f"{index.meta['truncated_docs']} cut to doc_max_length={index.meta['doc_max_length']}")


if __name__ == "__main__":
    app.run(main)
