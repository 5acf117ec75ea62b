"""Writing directories atomically: a crash or an error never leaves a half-written output that
looks complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(out_dir: str, prefix: str = ".tmp-") -> Iterator[str]:
    """Yields a fresh temporary sibling of `out_dir` to write into; on success it replaces
    `out_dir` (an existing one is removed first), on any exception it is deleted."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
