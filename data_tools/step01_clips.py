"""Step 01 of data_tools.prepare alone (clips); same options, earlier steps' outputs must exist."""
import sys

from data_tools.prepare import main

if __name__ == "__main__":
    sys.exit(main(steps=("01_clips",), description=__doc__))
