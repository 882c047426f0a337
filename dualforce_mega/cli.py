"""Entry-point wrapper shared by every command-line tool: an error the user caused ends with one line
(``error: <message naming the file / key>``, exit code 2) instead of a traceback; ``--debug`` (or
``DUALFORCE_DEBUG=1``) shows the traceback.

User errors are the exceptions the library raises for bad input: ``ValueError`` and its subclasses
(``ConfigError``, ``SchemaError``, ``BundleError``, ``OverlapError`` ...), missing / existing / unreadable
paths, and refused pickles. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
from typing import Callable, Optional, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "DUALFORCE_DEBUG"
EXIT_USER_ERROR = 2

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
    pickle.UnpicklingError)


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def strip_debug(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if a != DEBUG_FLAG]


def error_line(e: BaseException) -> str:
    """The message as one line (multi-line messages are joined)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return f"error: {text or type(e).__name__}"


def run_main(main: Callable[[list[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``main(argv)`` (``argv`` defaults to ``sys.argv[1:]`` without ``--debug``); returns its exit
    code, or 2 after printing one line for a user error."""
    raw = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(raw)
    try:
        return int(main(strip_debug(raw)) or 0)
    except USER_ERRORS as e:
        if debug:
            raise
        for handler in logging.getLogger().handlers:   # what was logged comes before the error line
            handler.flush()
        print(error_line(e), file=sys.stderr)
        return EXIT_USER_ERROR
