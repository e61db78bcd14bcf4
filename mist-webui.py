"""Mist's web UI from a checkout: `python mist-webui.py [--model PATH] [--port 7860] [--listen] [--auth user:pw]`.

Same as `mist webui`; works without `pip install -e .` (the source tree beside this file is used)."""

import sys
from pathlib import Path

try:
    from mist.faces.cli import main
except ImportError:  # run from a checkout without `pip install -e .`: use the source tree beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from mist.faces.cli import main

if __name__ == "__main__":
    sys.exit(main(["webui", *sys.argv[1:]]))
