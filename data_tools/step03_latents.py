"""Step 03 of data_tools.prepare alone (latents); same options, earlier steps' outputs must exist."""
import sys

from data_tools.prepare import main

if __name__ == "__main__":
    sys.exit(main(steps=("03_latents",), description=__doc__))
