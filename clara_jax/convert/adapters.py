"""Adapter bundles for a `Clara` (the format itself: `clara_jax.clara.formats.bundle`).

    python -m clara_jax.convert export-adapters --checkpoint WORKDIR_OR_MODEL --out_dir BUNDLE
    python -m clara_jax.convert import-adapters --adapters_dir BUNDLE \
        --base_model_dir BASE --out_dir MODEL
"""

from __future__ import annotations

from clara_jax.clara.formats import bundle
from clara_jax.clara.formats.bundle import CONFIG_FILE, TENSORS_FILE, load_base
from clara_jax.clara.model import Clara

__all__ = ["CONFIG_FILE", "TENSORS_FILE", "export_trainable", "import_trainable", "load_base"]


def export_trainable(source: Clara | str, out_dir: str) -> dict:
    """Writes the bundle of `source` (a `Clara`, a saved Clara directory or a training work
    directory); returns the written trainable_config.json dict."""
    clara = source if isinstance(source, Clara) else Clara.load(source)
    return bundle.save(out_dir, clara.parts)


def import_trainable(bundle_dir: str, base_dir: str, **settings) -> Clara:
    """A `Clara`: the bundle's adapters and added-token rows over the base model in
    `base_dir` (`bundle.load_base`); `settings` are `Clara`'s constructor keywords."""
    return Clara.from_parts(bundle.load(bundle_dir, base_dir), **settings)
