"""Mist v1.2's command line, kept working: `python mist_v3.py --input_dir_path DIR --output_dir NAME [...]`."""

import sys
from pathlib import Path

try:
    from mist.faces.legacy import main
except ImportError:  # run from a checkout without `pip install -e .`: use the source tree beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from mist.faces.legacy import main

if __name__ == "__main__":
    sys.exit(main())
