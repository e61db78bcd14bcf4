"""Running Mist's command lines in-process from a test."""

from __future__ import annotations

import mist.faces.cli


def run_cli(capsys, *args: object, main=mist.faces.cli.main) -> tuple[int, str, str]:
    """Run a command line in-process (`main`: `mist`'s by default); returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
