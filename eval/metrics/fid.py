"""FID of generated vs real frames (FID Inception pool3, pytorch-fid layout).

    python -m eval.metrics.fid --generated GEN_DIR [--real REAL_DIR] --out OUT [network flags]

The same as ``python -m eval.run_eval --metrics fid ...`` (every flag of run_eval works); docs/EVAL.md.
"""
import sys

from dualforce_mega.cli import run_main

from .cli import metric_main

if __name__ == "__main__":
    sys.exit(run_main(lambda argv: metric_main("fid", argv)))
