"""The per-metric command lines are ``eval.run_eval`` restricted to one metric."""
from __future__ import annotations

import sys
from typing import Optional


def metric_main(metric: str, argv: Optional[list[str]] = None) -> int:
    from ..run_eval import main as run_eval

    return run_eval(["--metrics", metric, *(sys.argv[1:] if argv is None else argv)])
