"""`python -m freqexp.orphans [tracking.uri=URI]`: the command; the code is freqexp.multirun.orphans."""
import sys

from freqexp.multirun.orphans import main

if __name__ == "__main__":
    sys.exit(main())
