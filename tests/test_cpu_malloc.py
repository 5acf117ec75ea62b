"""The glibc malloc settings: detection, captions, the warning, and that they take effect
(an XLA:CPU program's large temporary buffer is no longer mmapped afresh on every run)."""

import os
import subprocess
import sys

from clara_jax import cpu_malloc


def test_detection_and_caption():
    env = dict(cpu_malloc.HEAP_MALLOC_ENV)
    assert cpu_malloc.heap_malloc_set(env)
    assert "MALLOC_MMAP_MAX_=0" in cpu_malloc.describe(env)
    del env["MALLOC_ARENA_MAX"]
    assert not cpu_malloc.heap_malloc_set(env)
    assert "default" in cpu_malloc.describe(env)


def test_warns_only_on_cpu_without_the_settings(monkeypatch, capsys):
    for k in cpu_malloc.HEAP_MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    assert not cpu_malloc.warn_if_unset("tpu")
    assert cpu_malloc.warn_if_unset("cpu") == sys.platform.startswith("linux")
    for k, v in cpu_malloc.HEAP_MALLOC_ENV.items():
        monkeypatch.setenv(k, v)
    assert not cpu_malloc.warn_if_unset("cpu")
    err = capsys.readouterr().err
    assert err.count("MALLOC_MMAP_MAX_=0") == (1 if sys.platform.startswith("linux") else 0)


_PROGRAM = """
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.cos(jnp.sin(x) @ x.T) @ x).sum())   # 2 x 64 MB temporaries
x = jnp.ones((4000, 4000))
for _ in range(4):
    f(x).block_until_ready()
"""


def _large_mmaps(env) -> int:
    """Anonymous mmaps of 48 MB or more while the program runs (strace)."""
    import shutil
    import pytest
    if not shutil.which("strace") or not sys.platform.startswith("linux"):
        pytest.skip("needs strace on Linux")
    out = subprocess.run(["strace", "-f", "-e", "trace=mmap", sys.executable, "-c", _PROGRAM],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n = 0
    for line in out.stderr.splitlines():
        if "mmap(NULL, " in line and "MAP_ANONYMOUS" in line and "PROT_READ|PROT_WRITE" in line:
            size = int(line.split("mmap(NULL, ")[1].split(",")[0])
            n += size >= 48 << 20
    return n


def test_the_settings_keep_large_buffers_out_of_mmap():
    base = {k: v for k, v in os.environ.items() if k not in cpu_malloc.HEAP_MALLOC_ENV}
    base["JAX_PLATFORMS"] = "cpu"
    base["XLA_FLAGS"] = ""
    assert _large_mmaps(base) >= 4                       # a fresh mapping per run
    assert _large_mmaps({**base, **cpu_malloc.HEAP_MALLOC_ENV}) == 0
