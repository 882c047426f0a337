"""APD: mean absolute pitch / yaw / roll difference (MediaPipe FaceMesh + PnP) to the real video of the same name.

    python -m eval.metrics.apd --generated GEN_DIR [--real REAL_DIR] --out OUT [network flags]

The same as ``python -m eval.run_eval --metrics apd ...`` (every flag of run_eval works); docs/EVAL.md.
"""
import sys

from dualforce_mega.cli import run_main

from .cli import metric_main

if __name__ == "__main__":
    sys.exit(run_main(lambda argv: metric_main("apd", argv)))
