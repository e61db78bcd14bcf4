"""Which protected image belongs to which original: by the source SHA-256 a Mist output records (`mist:source-sha256`
in its PNG text, see `mist.runner.jobs.output_metadata`), else by file name without the suffix (`a.jpg` and `a.png`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mist.common import images
from mist.common.download import sha256_file


@dataclass(frozen=True)
class Pair:
    """An original and its protected version; `metadata`: the protected PNG's text (empty if it has none)."""

    original: Path
    protected: Path
    matched_by: str  # "sha256" or "name"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.original.stem


def image_files(path: Path) -> list[Path]:
    """`path` itself if it is a file, else the image files (by suffix, hidden ones left out) directly inside it.
    Raises ValueError naming `path` when it does not exist."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder")
    return sorted(p for p in path.iterdir()
                  if p.suffix.lower() in images.IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def match_pairs(originals: Path, protected: Path) -> tuple[list[Pair], list[str]]:
    """The pairs of `originals` and `protected` (files or folders), in the order of the protected files, and a line
    for each protected file that matches no original. Raises ValueError (naming the path) when either side has no
    image, or when no protected image matches an original."""
    sources, outputs = image_files(originals), image_files(protected)
    for side, found in ((originals, sources), (protected, outputs)):
        if not found:
            raise ValueError(f"{side}: no image files found")
    by_digest: dict[str, Path] | None = None
    by_stem: dict[str, list[Path]] = {}
    for source in sources:
        by_stem.setdefault(source.stem, []).append(source)
    pairs: list[Pair] = []
    unmatched: list[str] = []
    for output in outputs:
        text = images.read_png_text(output) or {}
        digest = text.get("mist:source-sha256")
        original, how = None, ""
        if digest:
            if by_digest is None:  # hashed only when some output records its source's digest
                by_digest = {sha256_file(source): source for source in sources}
            original, how = by_digest.get(digest), "sha256"
        if original is None and len(by_stem.get(output.stem, [])) == 1:
            original, how = by_stem[output.stem][0], "name"
        if original is None:
            unmatched.append(f"{output}: no original in {originals} with its name or recorded SHA-256")
            continue
        pairs.append(Pair(original, output, how, text))
    if not pairs:
        raise ValueError(f"{protected}: none of its images matches an image in {originals} (by file name or by the "
                         "source SHA-256 Mist records in its outputs)")
    return pairs, unmatched
