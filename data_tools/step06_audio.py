"""Step 06 of data_tools.prepare alone (audio features: HuBERT / wav2vec2 from --audio-encoder, 2 per video frame);
same options, earlier steps' outputs must exist."""
import sys

from data_tools.prepare import main
from dualforce_mega.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, steps=("06_audio",), description=__doc__)))
