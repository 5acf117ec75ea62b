"""Loading the project's ml-collections config files in tests, as `--config=FILE:ARG` does."""

import importlib.util
import os
import sys

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, arg: str = "", **overrides) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path` (relative to the repository root), with
    dotted `overrides` applied ({"mesh.data": 2, "batch_size": 8})."""
    sys.path.insert(0, ROOT)   # config files import `configs.common`
    spec = importlib.util.spec_from_file_location("config_under_test", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.update_from_flattened_dict(overrides)
    return c
