"""Watching an ensemble's members being read (`mist.engine.ensemble`)."""

from __future__ import annotations

from pathlib import Path


def count_member_loads(monkeypatch) -> list[str]:
    """The file or folder names of the members read from now on (in order), filled in as they are read."""
    from mist.engine import ensemble

    loaded: list[str] = []
    real = ensemble.load_model

    def counting(spec, **kwargs):
        loaded.append(Path(spec).name)
        return real(spec, **kwargs)

    monkeypatch.setattr(ensemble, "load_model", counting)
    return loaded
