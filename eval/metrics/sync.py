"""Sync-C / Sync-D / AV offset (SyncNet v2, syncnet_python's definition) of generated videos with their audio.

    python -m eval.metrics.sync --generated GEN_DIR [--real REAL_DIR] --out OUT [network flags]

The same as ``python -m eval.run_eval --metrics sync ...`` (every flag of run_eval works); docs/EVAL.md.
"""
import sys

from dualforce_mega.cli import run_main

from .cli import metric_main

if __name__ == "__main__":
    sys.exit(run_main(lambda argv: metric_main("sync", argv)))
