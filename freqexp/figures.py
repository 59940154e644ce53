"""`python -m freqexp.figures RUN_DIR|RUN_ID ...`: the command; the code is freqexp.multirun.figures."""
import sys

from freqexp.multirun.figures import main

if __name__ == "__main__":
    sys.exit(main())
