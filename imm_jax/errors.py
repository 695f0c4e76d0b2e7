"""User errors, and how the command lines report them.

A user error (a bad flag or config value, a missing or malformed file, a checkpoint of the wrong kind) is printed
as `<prog>: error: <what is wrong and what to do>` on stderr with exit status 2 and no traceback; anything else
is a bug and keeps its traceback. IMM_JAX_TRACEBACK=1 (or --verbosity=1 on `python -m imm_jax.main`) shows
tracebacks for user errors too.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(ValueError):
    """A mistake the user can fix; the message says what is wrong and what to do."""


USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def show_tracebacks() -> bool:
    return os.environ.get("IMM_JAX_TRACEBACK", "") not in ("", "0", "false", "False")


def run(prog: str, fn: Callable, *args, tracebacks: bool = False):
    """fn(*args), with user errors reported as one message and exit status 2."""
    try:
        return fn(*args)
    except USER_ERRORS as e:
        if tracebacks or show_tracebacks():
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
