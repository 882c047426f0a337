"""Step 02 of data_tools.prepare alone (quality); same options, earlier steps' outputs must exist."""
import sys

from data_tools.prepare import main
from dualforce_mega.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, steps=("02_quality",), description=__doc__)))
