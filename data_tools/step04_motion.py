"""Step 04 of data_tools.prepare alone (motion: LivePortrait from --motion-extractor, else the MediaPipe fallback);
same options, earlier steps' outputs must exist."""
import sys

from data_tools.prepare import main
from dualforce_mega.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, steps=("04_motion",), description=__doc__)))
