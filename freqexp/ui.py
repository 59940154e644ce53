"""`python -m freqexp.ui --uri STORE [--port PORT]`: print, for each experiment in a sqlite
store, the link that opens it on its runs table (MLflow 3.x opens experiments on its GenAI
overview otherwise). `make ui` runs it before the server."""
from __future__ import annotations

import argparse
import sys

from freqexp.tracking import UI_PORT, ui_base, ui_links


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freqexp.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", default="sqlite:///outputs/mlflow.db", help="tracking URI (default: %(default)s)")
    parser.add_argument("--port", type=int, default=UI_PORT, help="port the UI serves on (default: %(default)s)")
    args = parser.parse_args(argv)
    links = ui_links(args.uri, args.port)
    print(f"MLflow UI on {ui_base(args.port)}" + ("; runs tables:" if links else ""))
    for name, link in links.items():
        print(f"  {name}: {link}")
    if not links:
        print("  no experiments yet; a run prints its link. In the UI, 'Model training' (top left) shows runs tables.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
