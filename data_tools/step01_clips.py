"""Step 01 of data_tools.prepare alone (clips); same options, earlier steps' outputs must exist."""
import sys

from data_tools.prepare import main
from dualforce_mega.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, steps=("01_clips",), description=__doc__)))
