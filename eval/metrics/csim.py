"""CSIM and ACD (ArcFace ONNX embeddings) of generated videos against their reference images.

    python -m eval.metrics.csim --generated GEN_DIR [--real REAL_DIR] --out OUT [network flags]

The same as ``python -m eval.run_eval --metrics csim ...`` (every flag of run_eval works); docs/EVAL.md.
"""
import sys

from dualforce_mega.cli import run_main

from .cli import metric_main

if __name__ == "__main__":
    sys.exit(run_main(lambda argv: metric_main("csim", argv)))
