"""FVD of generated vs real videos, I3D TorchScript (stylegan-v); add --metrics fvd,fvd_r3d18 via run_eval for R3D-18.

    python -m eval.metrics.fvd --generated GEN_DIR [--real REAL_DIR] --out OUT [network flags]

The same as ``python -m eval.run_eval --metrics fvd ...`` (every flag of run_eval works); docs/EVAL.md.
"""
import sys

from dualforce_mega.cli import run_main

from .cli import metric_main

if __name__ == "__main__":
    sys.exit(run_main(lambda argv: metric_main("fvd", argv)))
