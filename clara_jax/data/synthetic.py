"""A synthetic world of invented entities, written in CLaRa's JSONL formats (no download).

    python -m clara_jax.data.synthetic --out_dir DIR [--seed 0 --num_entities 240 ...]

People (birthplace, birth year, occupation, employer), organisations (founder, founding
year, headquarters, industry) and cities (country, founding year) get names made of invented
syllables, so no real-world knowledge helps. Each entity has one document (about 40-120
words, facts in shuffled order and varied wording). Train and eval use disjoint people and
organisations (cities are shared background), so evaluation measures reading documents, not
memorised facts. Deterministic for a seed.

Files: pretrain_{train,eval}.jsonl (SCP: qa with simple and two-fact questions, paraphrase),
instruct_{train,eval}.jsonl (k documents, one or two gold), end_to_end_{train,eval}.jsonl and
eval.jsonl (num_candidates documents with same-type distractors, single- and two-hop
questions, pos_index), corpus.jsonl ({"id", "text"}), pretrain_text.txt, manifest.json.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from absl import app, flags

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
          "kr", "tr", "st", "sk"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "m", "k"]
OCCUPATIONS = ["painter", "engineer", "farmer", "teacher", "sailor", "baker", "poet",
               "doctor", "weaver", "miner", "judge", "singer"]
INDUSTRIES = ["shipping", "textiles", "mining", "printing", "farming", "glassmaking",
              "banking", "brewing", "clockmaking", "pottery"]
ORG_KINDS = ["Works", "Company", "Guild", "Group", "House", "Society"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _word(rng: random.Random, n: int) -> str:
    return "".join(_syllable(rng) for _ in range(n)).capitalize()


def _word_list(tag: str, count: int) -> list[str]:
    """`count` distinct invented two-syllable words, fixed for `tag` (not for the seed)."""
    rng, out = random.Random(f"words-{tag}"), []
    taken = set()
    while len(out) < count:
        w = _word(rng, 2)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


# Name lists of the "lists" naming (`World(name_style="lists")`): every name part, city,
# country, year, occupation and industry is one of a fixed set of words that a tokenizer can
# hold as single tokens (`single_token_words`), so that answering from a document is copying
# whole tokens. The lists are disjoint (one word, one role).
_LIST_ROLES = ("first", "last", "org", "city", "country")
_LISTS = {role: _word_list("names", 64 * len(_LIST_ROLES))[i::len(_LIST_ROLES)]
          for i, role in enumerate(_LIST_ROLES)}
LIST_YEARS = (1800, 1999)   # inclusive; every year of every entity in list-named worlds


def single_token_words() -> list[str]:
    """Every word a list-named world's answers are made of (names, cities, countries, years,
    organisation kinds, occupations, industries): the pieces a demo tokenizer keeps whole."""
    years = [str(y) for y in range(LIST_YEARS[0], LIST_YEARS[1] + 1)]
    return [w for role in _LIST_ROLES for w in _LISTS[role]] + \
        years + ORG_KINDS + OCCUPATIONS + INDUSTRIES


class World:
    """Entities with attributes; names are unique. Countries and cities come from
    `places_seed` when given (worlds with the same places_seed share their map, and only
    people and organisations differ), else from `seed`. name_style "syllables": every name
    is made of random syllables; "lists": names, places and years come from fixed lists
    (`single_token_words`), so the same names recur across worlds with other facts."""

    def __init__(self, seed: int, num_people: int, num_orgs: int, num_cities: int,
                 num_countries: int, places_seed: int | None = None,
                 name_style: str = "syllables"):
        if name_style not in ("syllables", "lists"):
            raise ValueError(f"name_style must be 'syllables' or 'lists', got {name_style!r}")
        lists = name_style == "lists"
        if lists:
            room = {"cities": (num_cities, len(_LISTS["city"])),
                    "countries": (num_countries, len(_LISTS["country"])),
                    "organisations": (num_orgs, len(_LISTS["org"]) * len(ORG_KINDS)),
                    "people": (num_people, len(_LISTS["first"]) * len(_LISTS["last"]) // 4)}
            over = [f"{k} {n} > {m}" for k, (n, m) in room.items() if n > m]
            if over:
                raise ValueError(f"name_style='lists' has too few names: {', '.join(over)}")
        used: set[str] = set()

        def name(rng: random.Random, role: str) -> str:
            """A new unique name: invented syllables (two words for a person, one plus a kind
            for an organisation, one otherwise), or the same shapes from the fixed lists."""
            while True:
                if lists:
                    parts = {"person": ("first", "last"), "org": ("org",)}.get(role, (role,))
                    n = " ".join(rng.choice(_LISTS[p]) for p in parts)
                else:
                    n = " ".join(_word(rng, 2) for _ in range(2 if role == "person" else 1))
                if role == "org":
                    n = f"{n} {rng.choice(ORG_KINDS)}"
                if n not in used:
                    used.add(n)
                    return n

        def year(r: random.Random, lo: int, hi: int) -> int:
            """A year in [lo, hi], or in LIST_YEARS for list names (single tokens)."""
            return r.randint(*(LIST_YEARS if lists else (lo, hi)))

        rng = random.Random(seed)
        places = rng if places_seed is None else random.Random(f"places-{places_seed}")
        self.countries = [name(places, "country") for _ in range(num_countries)]
        self.cities = [{"type": "city", "name": name(places, "city"),
                        "country": places.choice(self.countries),
                        "year": year(places, 900, 1700)} for _ in range(num_cities)]
        self.people = []
        for _ in range(num_people):
            self.people.append({"type": "person", "name": name(rng, "person"),
                                "city": rng.choice(self.cities)["name"],
                                "year": year(rng, 1800, 1990),
                                "occupation": rng.choice(OCCUPATIONS)})
        self.orgs = []
        for i in range(num_orgs):
            founder = self.people[i % len(self.people)]
            self.orgs.append({"type": "org", "name": name(rng, "org"),
                              "founder": founder["name"], "year": year(rng, 1850, 2000),
                              "city": rng.choice(self.cities)["name"],
                              "industry": rng.choice(INDUSTRIES)})
            founder.setdefault("employer", self.orgs[-1]["name"])
        self.rng = rng

    def assign_employers(self, people: list[dict], orgs: list[dict]) -> None:
        """Gives people without one an employer among `orgs` (same split: no leaks)."""
        for p in people:
            p.setdefault("employer", self.rng.choice(orgs)["name"])


def _facts(e: dict) -> list[tuple[str, list[str]]]:
    """(fact key, phrasings) of an entity; {n} is the name (or a pronoun-free reference)."""
    if e["type"] == "person":
        return [
            ("city", [f"{{n}} was born in {e['city']}.", f"The birthplace of {{n}} is {e['city']}.",
                      f"{{n}} came into the world in the city of {e['city']}."]),
            ("year", [f"{{n}} was born in the year {e['year']}.",
                      f"The birth year of {{n}} is {e['year']}.",
                      f"{{n}} was born in {e['year']}."]),
            ("occupation", [f"{{n}} worked as a {e['occupation']}.",
                            f"By trade, {{n}} was a {e['occupation']}.",
                            f"The occupation of {{n}} was {e['occupation']}."]),
            ("employer", [f"{{n}} was employed by {e['employer']}.",
                          f"For many years {{n}} worked for {e['employer']}.",
                          f"The employer of {{n}} was {e['employer']}."]),
        ]
    if e["type"] == "org":
        return [
            ("founder", [f"{{n}} was founded by {e['founder']}.",
                         f"The founder of {{n}} is {e['founder']}.",
                         f"{e['founder']} started {{n}}."]),
            ("year", [f"{{n}} was founded in {e['year']}.",
                      f"The founding year of {{n}} is {e['year']}.",
                      f"{{n}} opened its doors in {e['year']}."]),
            ("city", [f"{{n}} has its headquarters in {e['city']}.",
                      f"The headquarters of {{n}} are in {e['city']}.",
                      f"{{n}} is based in the city of {e['city']}."]),
            ("industry", [f"{{n}} works in {e['industry']}.",
                          f"The industry of {{n}} is {e['industry']}.",
                          f"{{n}} is known for {e['industry']}."]),
        ]
    return [
        ("country", [f"{{n}} is a city in {e['country']}.", f"{{n}} lies in {e['country']}.",
                     f"The country of {{n}} is {e['country']}."]),
        ("year", [f"{{n}} was founded in {e['year']}.", f"The city of {{n}} dates from "
                  f"{e['year']}.", f"{{n}} was first settled in {e['year']}."]),
    ]


FILLER = ["Records from that time are incomplete.", "Local archives mention this often.",
          "Little else is known about the early years.", "Many visitors come every spring.",
          "The story is told in several old books.", "Historians still discuss the details."]


DOC_STYLES = ("varied", "plain")


def _fact_sentences(e: dict, rng: random.Random, style: str) -> list[str]:
    """The entity's facts in shuffled order, each in a random one of its wordings ("varied")
    or in its first ("plain")."""
    if style not in DOC_STYLES:
        raise ValueError(f"document style must be one of {DOC_STYLES}, got {style!r}")
    facts = _facts(e)
    rng.shuffle(facts)
    return [(p[0] if style == "plain" else rng.choice(p)).format(n=e["name"])
            for _, p in facts]


def document(e: dict, rng: random.Random, filler_first: bool = False,
             style: str = "varied") -> str:
    """One document about an entity: its facts in shuffled order and a filler sentence (first
    with `filler_first`: then no name starts the document, whose first word has no space
    before it and so would be another token where the document follows a line break, as in a
    text-RAG prompt). style "varied": each fact in one of three wordings, and filler up to
    about 30 words; "plain": each fact in its first wording and one filler sentence, so that
    a document is a few dozen tokens."""
    sentences = _fact_sentences(e, rng, style)
    sentences.insert(0 if filler_first else rng.randrange(len(sentences) + 1),
                     rng.choice(FILLER))
    if style == "plain":
        return " ".join(sentences)
    while len(" ".join(sentences).split()) < 30:  # at least ~40 subword tokens
        sentences.append(rng.choice(FILLER))
    return " ".join(sentences)


# The one-fact question of each kind ({n}: the entity's name) and the entity field answering it.
QUESTION_TEMPLATES = {
    "person": (("birthplace", "Where was {n} born?", "city"),
               ("birth year", "In which year was {n} born?", "year"),
               ("occupation", "What was the occupation of {n}?", "occupation"),
               ("employer", "Who employed {n}?", "employer")),
    "org": (("founder", "Who founded {n}?", "founder"),
            ("founding year", "When was {n} founded?", "year"),
            ("headquarters", "Where is {n} based?", "city"),
            ("industry", "What industry is {n} in?", "industry")),
    "city": (("country", "In which country is {n}?", "country"),
             ("founding year", "When was {n} founded?", "year")),
}
MULTI_HOP_TEMPLATE = ("founder's birthplace", "In which city was the founder of {n} born?")


def questions(e: dict) -> list[tuple[str, str]]:
    """Simple one-fact (question, answer) pairs about an entity (QUESTION_TEMPLATES)."""
    return [(template.format(n=e["name"]), str(e[field]))
            for _, template, field in QUESTION_TEMPLATES[e["type"]]]


def question_kind(question: str) -> str:
    """The kind of a synthetic question ("birthplace", "founding year", ... as in
    QUESTION_TEMPLATES and MULTI_HOP_TEMPLATE), or "other" for any other text."""
    kinds = [(k, t) for group in QUESTION_TEMPLATES.values() for k, t, _ in group]
    for kind, template in kinds + [MULTI_HOP_TEMPLATE]:
        head, tail = template.split("{n}")
        if question.startswith(head) and question.endswith(tail) and \
                len(question) > len(head) + len(tail):
            return kind
    return "other"


def complex_question(e: dict) -> tuple[str, str]:
    """A question combining two facts of the same document."""
    n = e["name"]
    if e["type"] == "person":
        return (f"Where and in which year was {n} born?", f"{e['city']}, {e['year']}")
    if e["type"] == "org":
        return (f"Who founded {n} and in which year?", f"{e['founder']}, {e['year']}")
    return (f"In which country is {n} and when was it founded?", f"{e['country']}, {e['year']}")


def paraphrase(e: dict, rng: random.Random, style: str = "varied") -> str:
    """The entity's facts in another order (and, for style "varied", other wordings)."""
    return " ".join(_fact_sentences(e, rng, style))


def generate_corpus(out_dir: str, seed: int = 0, num_entities: int = 240,
                    num_candidates: int = 20, k: int = 5, eval_fraction: float = 0.2,
                    questions_per_entity: int = 2, places_seed: int | None = None,
                    multi_hop: bool = True, name_style: str = "syllables",
                    doc_style: str = "varied") -> dict[str, Any]:
    """Writes the corpus files into out_dir; returns {"files": {...}, "counts": {...}}.
    Corpora generated with the same `places_seed` share their cities and countries (see
    `World`). multi_hop=False leaves out the two-document questions (so every question has
    one gold document and k may be 1). name_style: see `World`; doc_style: see `document`."""
    if multi_hop and k < 2:
        raise ValueError(f"k={k}: two-document questions need k >= 2 (or multi_hop=False)")
    if num_entities < 20:
        raise ValueError(f"num_entities must be at least 20, got {num_entities}")
    n_people = num_entities // 2
    n_orgs = num_entities // 3
    world = World(seed, n_people, n_orgs, max(num_entities // 8, 6), max(num_entities // 40, 3),
                  places_seed=places_seed, name_style=name_style)
    rng = random.Random(seed + 1)
    # Disjoint people / organisations for eval; an org goes to eval with its founder.
    n_eval_orgs = max(int(len(world.orgs) * eval_fraction), 4)
    eval_orgs = world.orgs[-n_eval_orgs:]
    eval_people = {o["founder"] for o in eval_orgs}
    extra = [p["name"] for p in world.people[len(world.orgs):]]
    eval_people.update(extra[-max(int(len(extra) * eval_fraction), 1):])
    split = {"eval": [p for p in world.people if p["name"] in eval_people] + eval_orgs,
             "train": [p for p in world.people if p["name"] not in eval_people] +
             world.orgs[:-n_eval_orgs]}
    by_type = lambda ents, t: [e for e in ents if e["type"] == t]
    for part in ("train", "eval"):
        world.assign_employers(by_type(split[part], "person"), by_type(split[part], "org"))
    docs: dict[str, str] = {}
    for e in world.people + world.orgs + world.cities:
        docs[e["name"]] = document(e, rng, filler_first=name_style == "lists", style=doc_style)

    os.makedirs(out_dir, exist_ok=True)
    files, counts = {}, {}

    def write(name: str, rows: list) -> None:
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        files[name], counts[name] = path, len(rows)

    def candidates(ents: list, gold: list[dict], n: int, r: random.Random) -> tuple[list, list]:
        """n documents: gold ones plus same-type distractors first, then others; shuffled."""
        pool = [e for e in ents if e not in gold]
        same = [e for e in pool if e["type"] == gold[0]["type"]]
        r.shuffle(same)
        rest = [e for e in pool if e["type"] != gold[0]["type"]] + world.cities
        r.shuffle(rest)
        picked = gold + (same + rest)[:n - len(gold)]
        r.shuffle(picked)
        return [docs[e["name"]] for e in picked], [i for i, e in enumerate(picked) if e in gold]

    for part, ents in split.items():
        r = random.Random(f"{seed}-{part}")
        ents_all = ents + world.cities
        pre = []
        for e in ents_all:
            qa = questions(e)
            r.shuffle(qa)
            qa = qa[:questions_per_entity + 1] + [complex_question(e)]
            pre.append({"data_type": "qa", "question": [q for q, _ in qa],
                        "answers": [a for _, a in qa], "docs": [docs[e["name"]]]})
            pre.append({"data_type": "paraphrase", "question": [""],
                        "answers": [paraphrase(e, r, doc_style)], "docs": [docs[e["name"]]]})
        r.shuffle(pre)
        write(f"pretrain_{part}.jsonl", pre)

        single, multi = [], []
        for e in ents:
            for q, a in questions(e)[:questions_per_entity]:
                single.append((q, a, [e]))
        for o in by_type(ents, "org") if multi_hop else []:
            founder = next(p for p in world.people if p["name"] == o["founder"])
            multi.append((MULTI_HOP_TEMPLATE[1].format(n=o["name"]),
                          founder["city"], [o, founder]))
        instruct, e2e = [], []
        for q, a, gold in single + multi:
            d, pos = candidates(ents, gold, k, r)
            instruct.append({"question": q, "docs": d, "answer": a, "pos_index": pos})
            d, pos = candidates(ents, gold, num_candidates, r)
            e2e.append({"question": q, "docs": d, "answer": a, "golden_answers": [a],
                        "pos_index": pos})
        r.shuffle(instruct)
        r.shuffle(e2e)
        write(f"instruct_{part}.jsonl", instruct)
        write(f"end_to_end_{part}.jsonl", e2e)
        if part == "eval":
            write("eval.jsonl", e2e)

    corpus = [{"id": f"doc{i}", "text": t} for i, t in enumerate(docs.values())]
    write("corpus.jsonl", corpus)
    text_path = os.path.join(out_dir, "pretrain_text.txt")
    with open(text_path, "w", encoding="utf-8") as f:
        for e in split["train"] + world.cities:
            f.write(docs[e["name"]] + "\n")
            for q, a in questions(e):
                f.write(f"Question: {q} Answer: {a}\n")
    files["pretrain_text.txt"] = text_path
    manifest = {"seed": seed, "places_seed": places_seed, "multi_hop": multi_hop,
                "name_style": name_style, "doc_style": doc_style,
                "num_entities": num_entities, "num_candidates": num_candidates,
                "k": k, "counts": counts, "eval_entities": sorted(e["name"] for e in split["eval"])}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return {"files": files, "counts": counts}


flags.DEFINE_string("out_dir", None, "Where to write the corpus.")
flags.DEFINE_integer("seed", 0, "Random seed (same seed and flags: same bytes).")
flags.DEFINE_integer("num_entities", 240, "People + organisations + cities, roughly.")
flags.DEFINE_integer("num_candidates", 20, "Candidate documents per end-to-end question.")
flags.DEFINE_integer("k", 5, "Documents per instruction-tuning question.")
flags.DEFINE_integer("questions_per_entity", 2, "Simple questions per entity.")
flags.DEFINE_bool("multi_hop", True, "Also write two-document questions.")
flags.DEFINE_enum("name_style", "syllables", ["syllables", "lists"], "Invented names of "
                  "random syllables, or drawn from fixed word lists (one token each for a "
                  "tokenizer trained with `single_token_words`).")
flags.DEFINE_enum("doc_style", "varied", list(DOC_STYLES), "Documents with each fact in "
                  "one of three wordings plus filler, or in one plain wording (shorter).")
flags.DEFINE_integer("places_seed", None, "Cities and countries from this seed (corpora with "
                     "the same places_seed share them); default: from --seed.")


def main(argv):
    del argv
    out = generate_corpus(flags.FLAGS.out_dir, flags.FLAGS.seed, flags.FLAGS.num_entities,
                          flags.FLAGS.num_candidates, flags.FLAGS.k,
                          questions_per_entity=flags.FLAGS.questions_per_entity,
                          places_seed=flags.FLAGS.places_seed,
                          multi_hop=flags.FLAGS.multi_hop,
                          name_style=flags.FLAGS.name_style,
                          doc_style=flags.FLAGS.doc_style)
    for name, n in sorted(out["counts"].items()):
        print(f"{n:6d}  {out['files'][name]}")


if __name__ == "__main__":
    flags.mark_flag_as_required("out_dir")
    app.run(main)
