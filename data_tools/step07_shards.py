"""Step 07 of data_tools.prepare alone (shards); same options, earlier steps' outputs must exist."""
import sys

from data_tools.prepare import main

if __name__ == "__main__":
    sys.exit(main(steps=("07_shards",), description=__doc__))
