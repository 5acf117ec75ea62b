"""Retrieval-augmented answers over a compressed corpus index (library side of
`python -m clara_jax.answer`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from clara_jax.infer.corpus_index import CorpusIndex, search


def answer(model, index: CorpusIndex, questions: Sequence[str], k: int = 5,
           max_new_tokens: int = 64) -> list[dict]:
    """Retrieves each question's top-k documents with the query reasoner and answers from
    their stored states with the generator.

    Returns per question {"question", "answer", "documents": [{"id", "score", "text"}]}."""
    ids, scores, rows = search(model, index, questions, k)
    out = model.generate_from_compressed_documents_and_questions(
        list(questions), index.states(rows), max_new_tokens=max_new_tokens)
    return [{"question": q, "answer": text,
             "documents": [{"id": i, "score": float(s), "text": index.doc(int(r))["text"]}
                           for i, s, r in zip(ids[b], np.asarray(scores[b]), rows[b])]}
            for b, (q, text) in enumerate(zip(questions, out.texts))]


def format_answer(result: dict, width: int = 80) -> str:
    """The answer, then one line per retrieved document: score, id, first `width` chars."""
    lines = [f"Q: {result['question']}", f"A: {result['answer']}", "retrieved:"]
    for d in result["documents"]:
        lines.append(f"  {d['score']:+.4f}  {d['id']}  {d['text'][:width]}")
    return "\n".join(lines)
