"""Step 05 of data_tools.prepare alone (FLAME: --flame-dir files, else EMOCA on the crops, else has_flame=false);
same options, earlier steps' outputs must exist."""
import sys

from data_tools.prepare import main
from dualforce_mega.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, steps=("05_flame",), description=__doc__)))
