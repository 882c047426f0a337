"""Step 02 of data_tools.prepare alone (quality); same options, earlier steps' outputs must exist."""
import sys

from data_tools.prepare import main

if __name__ == "__main__":
    sys.exit(main(steps=("02_quality",), description=__doc__))
