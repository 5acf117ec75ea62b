"""How a command ends: one line on stderr naming the bad input, and an exit status that says
which kind of failure it was. The full traceback only with `--verbose`.

Exit statuses (documented in docs/training.md, "Exit statuses"):

    0   done
    2   user error: a bad flag, config field, data file or record (`UserError`, `ValueError`,
        `KeyError`, `FileNotFoundError` of an input, absl's `UsageError`)
    3   storage or system error: disk full, permission denied, a corrupt checkpoint with no
        intact one to fall back to (`StorageError`, `OSError`)
    4   the run diverged (`DivergenceError`): no model was exported
    75  preempted (SIGTERM): the state is saved; rerun the same command to resume (EX_TEMPFAIL,
        which schedulers read as "retry")

Library modules raise these exceptions; only command-line entry points call `run_command`.
"""

from __future__ import annotations

import errno
import re
import sys
import threading
import traceback
from typing import Callable

from absl import flags

EXIT_OK = 0
EXIT_USER = 2
EXIT_STORAGE = 3
EXIT_DIVERGED = 4
EXIT_PREEMPTED = 75


class UserError(ValueError):
    """A bad input the user can fix: the message names the file, line or field."""


class StorageError(OSError):
    """Storage failed or holds something unreadable: the message names the path and cause."""


class DivergenceError(FloatingPointError):
    """Training diverged (non-finite values, a dead gradient, a loss stuck at chance)."""


class Preempted(Exception):
    """The run was asked to stop (SIGTERM) and saved its state; rerunning resumes it."""


def exit_status(exc: BaseException) -> int:
    """The exit status of a command that ended with `exc` (table in the module docstring)."""
    if isinstance(exc, Preempted):
        return EXIT_PREEMPTED
    if isinstance(exc, DivergenceError):
        return EXIT_DIVERGED
    if isinstance(exc, UserError):
        return EXIT_USER
    if isinstance(exc, FileNotFoundError):
        return EXIT_USER
    if isinstance(exc, OSError):
        return EXIT_STORAGE
    if _storage_message(str(exc)):   # tensorstore / XLA write failures (any type)
        return EXIT_STORAGE
    if type(exc).__name__ in ("UsageError", "ConfigError") or isinstance(
            exc, (ValueError, KeyError, TypeError, AttributeError)):
        return EXIT_USER
    return 1


def _storage_message(text: str) -> str:
    """For a failed write reported as text (tensorstore / Orbax / XLA `RESOURCE_EXHAUSTED`,
    `Failed writing`): `<the system's cause>: <the file>`; "" for any other text."""
    if "RESOURCE_EXHAUSTED" not in text and "Failed writing" not in text:
        return ""
    path = re.search(r'Failed writing: "([^"]+)"', text) or re.search(r'file "([^"]+)"', text)
    cause = re.search(r"(No space left on device|Disk quota exceeded|Permission denied|"
                      r"Read-only file system)", text)
    if not (path or cause) and "RESOURCE_EXHAUSTED" in text and "writ" not in text.lower():
        return ""   # out of device memory: not storage
    where = f": {path.group(1)}" if path else ""
    return (cause.group(1) if cause else "write failed") + where


def one_line(exc: BaseException) -> str:
    """`exc` as one line: its own message, or for an OSError the path and the system's cause
    (`No space left on device: /path`); the root cause when `exc` wraps another."""
    root = exc
    while isinstance(root, Exception) and root.__cause__ is not None and not str(root):
        root = root.__cause__
    if isinstance(root, OSError) and not isinstance(root, StorageError) and root.errno:
        path = root.filename or ""
        cause = root.strerror or errno.errorcode.get(root.errno, str(root.errno))
        text = f"{cause}: {path}" if path else cause
    elif _storage_message(str(root)):
        text = _storage_message(str(root))
    else:
        text = str(root) or type(root).__name__
    if isinstance(root, KeyError) and text.startswith(("'", '"')):
        text = f"unknown key {text}"
    first = text.strip().splitlines()[0] if text.strip() else type(root).__name__
    return f"{type(root).__name__}: {first}" if exit_status(root) == 1 else first


def run_command(main: Callable[[], object], name: str, verbose: bool = False) -> int:
    """Runs a command's `main()` and returns its exit status: 0, or the status of the
    exception it raised after printing `name: <one line>` on stderr (and the traceback with
    `verbose`). KeyboardInterrupt is re-raised. Without `verbose` the tracebacks that library
    threads and callbacks print on their own (an Orbax save failing on a full disk prints
    hundreds of lines) are dropped until the command succeeds."""
    hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
    if not verbose:   # library threads' and callbacks' tracebacks: the one line says it
        sys.excepthook = sys.unraisablehook = lambda *a: None
        threading.excepthook = lambda args: None
    try:
        main()
        sys.excepthook, sys.unraisablehook, threading.excepthook = hooks
        return EXIT_OK
    except KeyboardInterrupt:
        raise
    except SystemExit as e:   # absl / argparse usage errors carry their own status
        return e.code if isinstance(e.code, int) else EXIT_USER
    except BaseException as e:   # noqa: BLE001 - every failure ends in one line
        if verbose:
            traceback.print_exc()
        print(f"{name}: {one_line(e)}", file=sys.stderr, flush=True)
        return exit_status(e)


def flags_parser(name: str) -> Callable[[list[str]], list[str]]:
    """An absl `app.run(main, flags_parser=...)` parser that ends a bad command line (an
    unknown flag, an unknown or ill-typed `--config.field`, which ml_collections raises while
    the flags are parsed) with one line `name: <message>` and exit status 2 (the traceback
    too with `--verbose` on the command line). `--help` is left to absl."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except Exception as e:   # noqa: BLE001 - every bad command line ends in one line
            verbose = any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv)
            if verbose:
                traceback.print_exc()
            print(f"{name}: {_flag_error(e, argv)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER)

    return parse


def _flag_error(exc: BaseException, argv: list[str]) -> str:
    """One line for a command line that failed to parse: an unknown config field (which
    ml_collections raises as a KeyError / AttributeError of the bare name) names its flag."""
    if isinstance(exc, (KeyError, AttributeError)):
        key = str(exc).strip("'\"")
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                     and key in a.split("=")[0].split(".")), None)
        if flag:
            return f"unknown config field {flag[2:]!r} ({flag})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if type(exc).__module__.startswith("absl") else one_line(exc)
