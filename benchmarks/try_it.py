"""A newcomer's first run, timed: the README's first command with `--model tiny-random` on three 512 x 512 paintings.

    python benchmarks/try_it.py [--images DIR] [--install]

Copies the first three images of `--images` (default: ../shared/data/vangogh beside the checkout, or any folder of
512 x 512 images) into a fresh temporary folder and times, as separate processes, exactly what the README says to
type there:

- with `--install`: `python3 -m venv .venv && .venv/bin/pip install -e <checkout>` in that folder (the README's install
  step; pip may take packages from its cache);
- `mist protect my-art/ -o protected/ --model tiny-random` (default settings: the test model's 10 steps), with the
  `mist` of the fresh environment, or of this interpreter's environment without `--install`.

Prints one Markdown row per command (seconds, CPU, date, load average before it started) and checks that three
outputs were written with the settings recorded. Timings depend on what else runs on the machine: the load average
is printed so that a loaded run can be recognised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "vangogh"


def cpu_name() -> str:
    """The CPU's model name and the vector extensions that matter for PyTorch on it."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    extensions = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{name} ({os.cpu_count()} cores; {' '.join(extensions) or 'no AVX2'})"


def timed(command: str, folder: Path) -> float:
    """Seconds `command` (a shell line) took in `folder`; raises when it fails."""
    started = time.perf_counter()
    subprocess.run(command, shell=True, cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def row(what: str, seconds: float, load: float) -> str:
    today = datetime.date.today().isoformat()
    return f"| {what} | {seconds:.1f} | {cpu_name()} | {today} | {load:.2f} |"


def recorded_steps(folder: Path) -> list[int]:
    from PIL import Image

    steps = []
    for png in sorted(folder.glob("*.png")):
        with Image.open(png) as picture:
            steps.append(json.loads(picture.text["mist:settings"])["steps"])
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder with at least three images")
    parser.add_argument("--install", action="store_true", help="also time the README's install into a fresh venv")
    args = parser.parse_args()
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:3]
    if len(images) < 3:
        print(f"{args.images}: needs three images, found {len(images)}", file=sys.stderr)
        return 2
    print("| command | seconds | CPU | date | load average (1 min) before |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="mist-try-it-") as work:
        folder = Path(work)
        (folder / "my-art").mkdir()
        for image in images:
            shutil.copy(image, folder / "my-art" / image.name)
        mist = Path(sys.executable).parent / "mist"
        if args.install:
            load = os.getloadavg()[0]
            seconds = timed(f"python3 -m venv .venv && .venv/bin/pip install -q -e {ROOT}", folder)
            print(row("`python3 -m venv .venv && .venv/bin/pip install -e .`", seconds, load))
            mist = folder / ".venv" / "bin" / "mist"
        load = os.getloadavg()[0]
        seconds = timed(f"{mist} protect my-art/ -o protected/ --model tiny-random", folder)
        print(row("`mist protect my-art/ -o protected/ --model tiny-random` (3 images, 512 x 512)", seconds, load))
        steps = recorded_steps(folder / "protected")
        print(f"\noutputs: {len(steps)}, steps recorded in each: {steps}")
        return 0 if len(steps) == 3 else 1


if __name__ == "__main__":
    sys.exit(main())
