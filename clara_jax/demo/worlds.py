"""The demo's data: synthetic worlds for CLaRa and for the base, the base's reading lessons,
its whole-word list and the evaluation file."""

from __future__ import annotations

import json
import os
import random
from typing import Sequence

from clara_jax.clara import prompts
from clara_jax.data import formats, synthetic


def write_base_text(world_dirs: list[str], out_path: str, closed_book_every: int = 4) -> str:
    """The base LM's pretraining texts (JSONL {"text", "prompt"}) from the base worlds, which
    share no entity with the worlds CLaRa is trained and evaluated on. One reading lesson per
    document: a chat whose first turn is the text-RAG prompt `evaluate` uses for its full-text
    baseline (the document, then a question) and whose later turns ask the document's other
    questions, each followed by its answer; the loss skips the first prompt (context) and
    covers the answers (the signal that teaches reading) and the later questions. Also
    closed-book answers for one question in `closed_book_every` (loss on the answer only).
    Returns out_path."""

    records: list[dict] = []
    rng = random.Random(0)
    for world_dir in world_dirs:
        qa, _ = formats.read_jsonl([os.path.join(world_dir, f"instruct_{s}.jsonl")
                                    for s in ("train", "eval")], "instruct")
        by_doc: dict[str, list[tuple[str, str]]] = {}
        for i, r in enumerate(qa):
            gold = r["docs"][r["pos_index"][0]]
            by_doc.setdefault(gold, []).append((r["question"], r["answers"][0]))
            if closed_book_every and i % closed_book_every == 0:
                records.append({"text": prompts.closed_book_string(r["question"],
                                                                   r["answers"][0]),
                                "prompt": prompts.closed_book_string(r["question"])})
        for doc, pairs in by_doc.items():
            rng.shuffle(pairs)
            (q, a), rest = pairs[0], pairs[1:]
            prompt = prompts.full_text_string(q, [doc])
            text = prompts.full_text_string(q, [doc], a) + "".join(
                f"[INST] Question:{q} [/INST] {a}</s>" for q, a in rest)
            records.append({"text": text, "prompt": prompt})
    rng.shuffle(records)
    with open(out_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return out_path


def write_whole_words(out_path: str) -> str:
    """The words the base's tokenizer keeps as single tokens: every name, place, year, kind,
    occupation and industry of list-named worlds (`synthetic.single_token_words`), so that
    answering from a document is copying whole tokens. Returns out_path."""
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(synthetic.single_token_words()) + "\n")
    return out_path


def make_worlds(cfg, workdir: str, roles: Sequence[str] = ("clara", "base")
                ) -> dict[str, list[str]]:
    """Generates the synthetic worlds of `roles` (idempotent): {"base": dirs, "clara": dirs}.
    CLaRa worlds have seeds cfg.seed, cfg.seed + 1, ...; the base's cfg.base.seed, ... (apart,
    so that the base knows none of the facts CLaRa is evaluated on, and the same for every
    cfg.seed). The first `cfg.eval_worlds` CLaRa worlds' eval splits (held-out entities) are
    the evaluation set."""

    out: dict[str, list[str]] = {"base": [], "clara": []}
    for role, count, first_seed in (("clara", cfg.worlds, cfg.seed),
                                    ("base", cfg.base.worlds, cfg.base.seed)):
        if role not in roles:
            continue
        for i in range(count):
            path = os.path.join(workdir, "data", f"{role}_world{i}")
            if not os.path.exists(os.path.join(path, "manifest.json")):
                synthetic.generate_corpus(path, seed=first_seed + i,
                                          num_entities=cfg.num_entities,
                                          num_candidates=cfg.num_candidates, k=cfg.top_k,
                                          places_seed=cfg.places_seed,
                                          questions_per_entity=cfg.questions_per_entity,
                                          multi_hop=cfg.multi_hop,
                                          name_style=cfg.name_style, doc_style=cfg.doc_style)
            out[role].append(path)
    return out


def write_eval_file(cfg, worlds: dict[str, list[str]], workdir: str) -> str:
    """The held-out questions of the first `cfg.eval_worlds` CLaRa worlds in one file."""
    path = os.path.join(workdir, "data", "eval.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for w in worlds["clara"][:cfg.eval_worlds]:
            f.write(open(os.path.join(w, "eval.jsonl"), encoding="utf-8").read())
    return path
