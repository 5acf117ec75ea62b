"""Compress a corpus once into a resumable on-disk index (see `clara_jax.infer.index`).

    python -m clara_jax.compress_corpus --checkpoint DIR --input docs.jsonl --out_dir INDEX \
        [--batch_size 64] [--chunk_size 4096] [--dtype float32]

docs.jsonl holds {"id": str, "text": str} rows (a .txt file: one document per line). A rerun
into the same --out_dir continues after the last complete chunk; a different input or
checkpoint is refused.
"""

from absl import app, flags

flags.DEFINE_string("checkpoint", None, "A saved Clara directory or a training work directory.")
flags.DEFINE_string("input", None, "JSONL of {\"id\", \"text\"} (or .txt, one doc per line).")
flags.DEFINE_string("out_dir", None, "Index directory (created; resumed if partial).")
flags.DEFINE_integer("batch_size", 64, "Documents per encoder batch.")
flags.DEFINE_integer("chunk_size", 4096, "Documents per stored chunk.")
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Stored state dtype.")
flags.mark_flags_as_required(["checkpoint", "input", "out_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from clara_jax.clara.model import Clara
    from clara_jax.infer.index import build_index

    model = Clara.load(FLAGS.checkpoint)
    index = build_index(model, FLAGS.input, FLAGS.out_dir, batch_size=FLAGS.batch_size,
                        chunk_size=FLAGS.chunk_size, dtype=FLAGS.dtype)
    print(f"{FLAGS.out_dir}: {len(index)} documents in {index.num_chunks} chunks, "
          f"{index.meta['truncated_docs']} cut to doc_max_length={index.meta['doc_max_length']}")


if __name__ == "__main__":
    app.run(main)
