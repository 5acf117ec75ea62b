"""The demo's claims, each tested on paired per-question scores with a margin in standard errors."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def paired_margin(a: Sequence[float], b: Sequence[float] = (), offset: float = 0.0,
                  scale_b: float = 1.0) -> tuple[float, float, float]:
    """The claim mean(a) - scale_b * mean(b) >= offset on paired per-question scores (b empty:
    a alone): returns (excess over offset, standard error of the mean paired difference,
    excess in standard errors). An error of zero (every question alike) counts as 1/n."""
    d = np.asarray(a, np.float64)
    if len(b):
        d = d - scale_b * np.asarray(b, np.float64)
    n = len(d)
    se = max(float(d.std(ddof=1)) / np.sqrt(n) if n > 1 else 1.0, 1.0 / n)
    excess = float(d.mean()) - offset
    return excess, se, excess / se


CLAIM_GROUPS = ("base", "compression", "retrieval")


def check(cfg, per_question: dict[str, list[float]]) -> tuple[list[str], list[str]]:
    """The demo's claims, each on paired per-question scores with a margin of at least
    cfg.check.min_sigmas standard errors (`paired_margin`), in three groups (CLAIM_GROUPS).
    Claims of the groups in cfg.check.gate decide the exit status ("ok" / "FAIL"); the others
    are measured and reported as targets ("met" / "MISS"). Returns (report lines, failures).

    - the base reads: full text (oracle) EM >= min_full_text_em, closed book <= max_closed_book_em;
    - compressed (oracle, after stage 3) EM at the lowest rate within max_gap_to_full_text of
      full text, and >= min_em_at_16x at every rate of 16 or more;
    - EM falls (weakly) as the rate rises: no rate is significantly above a lower one;
    - stage 3 raises Recall@1 by >= min_recall_gain at every rate;
    - after stage 3, normal-setting EM >= min_normal_over_oracle x oracle EM at every rate."""
    k, pq = cfg.check, per_question
    rates = sorted({int(key.split("/")[1]) for key in pq if key.startswith("compressed/")})
    comp = lambda r, setting, stage="after stage 3", m="em": pq[
        f"compressed/{r}/{setting}/{stage}/{m}"]
    full = pq["full text/1/oracle//em"]
    closed = [-x for x in pq["closed book/-/-//em"]]
    gate = {g.strip() for g in str(k.gate).split(",") if g.strip()}
    unknown = gate - set(CLAIM_GROUPS)
    if unknown:
        raise ValueError(f"config.check.gate: unknown claim groups {sorted(unknown)}; known: "
                         f"{CLAIM_GROUPS}")
    # (group, name, target, a, b, offset, scale of b); offset None: a - b not significantly
    # below 0 (a higher rate's EM not significantly above a lower rate's).
    claims = [
        ("base", "full text (oracle) EM", f">= {k.min_full_text_em}", full, [],
         k.min_full_text_em, 1),
        ("base", "closed book EM", f"<= {k.max_closed_book_em}", closed, [],
         -k.max_closed_book_em, 1),
        ("compression", f"compressed {rates[0]}x (oracle) EM - full text EM",
         f">= -{k.max_gap_to_full_text}", comp(rates[0], "oracle"), full,
         -k.max_gap_to_full_text, 1)]
    claims += [("compression", f"compressed {r}x (oracle) EM", f">= {k.min_em_at_16x}",
                comp(r, "oracle"), [], k.min_em_at_16x, 1) for r in rates if r >= 16]
    claims += [("compression", f"compressed {lo}x - {hi}x (oracle) EM", "not significantly < 0",
                comp(lo, "oracle"), comp(hi, "oracle"), None, 1)
               for lo, hi in zip(rates, rates[1:])]
    for r in rates:
        claims.append(("retrieval", f"{r}x Recall@1 gain from stage 3", f">= {k.min_recall_gain}",
                       comp(r, "normal", m="hit1"), comp(r, "normal", "before stage 3", "hit1"),
                       k.min_recall_gain, 1))
        claims.append(("retrieval", f"{r}x normal EM - {k.min_normal_over_oracle} x oracle EM",
                       ">= 0", comp(r, "normal"), comp(r, "oracle"), 0.0,
                       k.min_normal_over_oracle))
    report, failures = [], []
    for group, name, target, a, b, offset, scale in claims:
        excess, se, sigmas = paired_margin(a, b, offset or 0.0, scale)
        ok = sigmas > -k.min_sigmas if offset is None else sigmas >= k.min_sigmas
        status = ("ok  " if ok else "FAIL") if group in gate else ("met " if ok else "MISS")
        line = (f"{status} [{group}] {name} {target}: margin {excess:+.3f} (SE {se:.3f}, "
                f"{sigmas:+.1f} SE; needs {'> -' if offset is None else '>= '}{k.min_sigmas})")
        report.append(line)
        if not ok and group in gate:
            failures.append(line)
    return report, failures
