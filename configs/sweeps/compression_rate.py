# python -m clara_jax.train.sweep --config=configs/sweeps/compression_rate.py:stage=pretrain,model=tiny,rates=4,16,32,128 --workdir=workdir/sweep_compression
# python -m clara_jax.train.sweep_table --workdir=workdir/sweep_compression
"""Compression-rate sweep: the same stage trained once per compress_rate, each run in
`{workdir}/rate_{r}` (resumed if interrupted, skipped if finished), then one Markdown + JSON
table of every run's final train / eval metrics (`{workdir}/sweep_table.md`, `.json`).

Arguments after the colon: `stage` (pretrain | instruct | end_to_end | retrieval_pretrain),
`model` (tiny | mid | mistral_7b), `rates` (comma- or slash-separated), `doc_max_length`
(0: 128 for tiny, the official 256 otherwise; it must be a multiple of every rate, which the
sweep checks before anything trains). Every other field is the stage config's and can be
overridden as usual (`--config.total_steps=200`, `--config.init_from=workdir/base`).
"""

from configs import common


def _join_rates(arg: str) -> str:
    """`a=1,rates=4,16,b=2` -> `a=1,rates=4/16,b=2`: list items without `=` continue the
    previous value (common.parse_arg splits on commas)."""
    items: list[str] = []
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        if "=" in item or not items:
            items.append(item)
        else:
            items[-1] += "/" + item
    return ",".join(items)


def get_config(arg: str = ""):
    a = common.parse_arg(_join_rates(arg), stage="pretrain", model="tiny", rates="4/16/32/128",
                         doc_max_length=0)
    rates = tuple(int(r) for r in a.rates.split("/"))
    c = common.base_config(a.stage, a.model)
    c.doc_max_length = a.doc_max_length or (128 if a.model == "tiny" else 256)
    c.compress_rate = rates[0]
    c.sweep_compress_rates = rates
    return c
