"""The demo's base LM: the recipe that determines it, the shipped one (clara_jax/demo_base)
and its export."""

from __future__ import annotations

import json
import os
import platform
import shutil


# clara_jax/, where the shipped base lives (package data).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_BASE = os.path.join(_PACKAGE_DIR, "demo_base")
# The demo config fields a base depends on (with every field of cfg.base but `shipped`).
BASE_FIELDS = ("model", "name_style", "doc_style", "num_entities", "num_candidates",
               "questions_per_entity", "places_seed", "top_k", "multi_hop", "doc_max_length",
               "scan_layers")


def base_recipe(cfg) -> dict:
    """Everything that determines the demo's base, as {dotted config field: value}: the
    BASE_FIELDS and every field of cfg.base but `shipped`."""
    recipe = {k: cfg[k] for k in BASE_FIELDS}
    recipe.update({f"base.{k}": v for k, v in cfg.base.items() if k != "shipped"})
    return json.loads(json.dumps(recipe))


def shipped_base(cfg) -> str | None:
    """The model directory of the shipped base when cfg.base.shipped names one (relative to
    the package, e.g. "demo_base", or absolute), None when it is empty (train the base).
    Raises ValueError, naming the first differing field, when the config asks for another
    base than the one shipped, so that an override never silently uses a base it does not
    describe."""
    if not cfg.base.shipped:
        return None
    path = os.path.join(_PACKAGE_DIR, cfg.base.shipped)   # an absolute path stays as it is
    info_path = os.path.join(path, "base_info.json")
    if not os.path.exists(info_path):
        raise FileNotFoundError(f"config.base.shipped: {path} has no base_info.json (make one "
                                f"with --only=base --export_base=DIR, or pass "
                                f"--config.base.shipped= to train the base)")
    shipped, wanted = json.load(open(info_path))["recipe"], base_recipe(cfg)
    diff = sorted(k for k in set(wanted) | set(shipped) if wanted.get(k) != shipped.get(k))
    if diff:
        raise ValueError(f"config.{diff[0]}: {wanted.get(diff[0])!r} differs from the "
                         f"shipped base's {shipped.get(diff[0])!r} ({path}); pass "
                         f"--config.base.shipped= to train a base for this config")
    return os.path.join(path, "model")


def export_base(cfg, base_dir: str, out_dir: str, seconds: float, rows: list[dict],
                by_kind: dict[str, dict[str, float]] | None = None) -> None:
    """Copies a trained base (`base_dir`, a model directory) to out_dir/model with
    base_info.json: its recipe (`base_recipe`), training time, machine, probe rows and EM by
    question kind (`report.kind_table`)."""
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    shutil.copytree(base_dir, os.path.join(out_dir, "model"))
    flags_ = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = "AVX-512" if " avx512f" in flags_ else "AVX2" if " avx2" in flags_ else "other"
    info = {"recipe": base_recipe(cfg), "train_seconds": round(seconds),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, {isa}",
            "probe": [{k: r[k] for k in ("system", "setting", "em", "f1", "n")} for r in rows],
            "probe_by_kind": by_kind or {}}
    with open(os.path.join(out_dir, "base_info.json"), "w") as f:
        json.dump(info, f, indent=2)
