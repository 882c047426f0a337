"""Step 03 of data_tools.prepare alone (latents); same options, earlier steps' outputs must exist."""
import sys

from data_tools.prepare import main
from dualforce_mega.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, steps=("03_latents",), description=__doc__)))
