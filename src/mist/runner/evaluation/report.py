"""The evaluation report: REPORT_DIR/index.html (opens in a browser from disk, no server: its pictures and plots are
files beside it), results.json (everything measured) and results.csv (one row per image x purification x mimicry).
Every file is written atomically (`mist.common.files.write_atomic`): a reader never sees a half-written report file.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mist.common import files
from mist.version import __version__
from mist.runner.evaluation.scores import BOOTSTRAP_DRAWS, CONFIDENCE, Score

if TYPE_CHECKING:
    from PIL import Image

    from mist.runner.evaluation.run import Evaluation

RANDOM_WEIGHTS_WARNING = ("This model has random weights (a test model): every number below is meaningless for "
                          "protection. Use a real Stable Diffusion v1 checkpoint to judge it.")
SCORE_COLUMNS = ("rmse_levels", "ssim", "latent_mse", "target_pull", "target_mse_protected", "target_mse_clean",
                 "target_mse_reference", "loss_clean", "loss_protected", "floor_ssim", "control_ssim", "effect",
                 "holds", "clip_similarity")
# What the page's score tables show, in words an artist reads (the verdict first; every number, the method's losses
# and the target distances included, is in results.csv and results.json under its field name).
PAGE_COLUMNS = (("holds", "Protection holds?"), ("ssim", "Likeness of the two mimicries (SSIM, 1 = same)"),
                ("floor_ssim", "Likeness of two mimicries of the original (other seed)"),
                ("control_ssim", "Likeness after random noise of the same size"),
                ("effect", "Effect beyond chance (above 0: protects)"),
                ("rmse_levels", "Pixel difference of the two mimicries (0-255)"),
                ("target_pull", "Pull toward the target pattern (0 none, 1 full)"),
                ("clip_similarity", "CLIP likeness of the two mimicries (1 = same)"))
# The whole-set numbers (`scores.SetScore`), in words: CMMD and the no-reference quality of the mimicry outputs.
SET_COLUMNS = (("cmmd", "CMMD, clean vs protected mimicries (x1000, 0 = alike)"),
               ("brisque_clean", "BRISQUE of clean mimicries (higher: worse)"),
               ("brisque_protected", "BRISQUE of protected mimicries"),
               ("niqe_clean", "NIQE of clean mimicries (higher: worse)"),
               ("niqe_protected", "NIQE of protected mimicries"))
INVISIBILITY_LABELS = {"psnr_db": "PSNR (dB, higher: less visible)", "ssim": "SSIM with the original (1 = same)",
                       "ms_ssim": "MS-SSIM with the original (1 = same)",
                       "vif": "VIF: information kept (1 = all)",
                       "linf_levels": "Largest pixel change (0-255)", "l2_levels": "Overall change (L2, 0-255)",
                       "lpips": "LPIPS (0 = same)"}


def write_report(evaluation: Evaluation, folder: Path, shown_from: Path | None = None) -> Path:
    """Write the report of `evaluation` into `folder` (created if needed); returns the path of index.html. Files are
    named as the evaluation was given them, or relative to `shown_from` (a server's job folder: its own paths are
    nobody's business)."""
    if shown_from is not None:
        evaluation = _named_from(evaluation, shown_from)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = {}
    for number, result in enumerate(evaluation.images):
        for column, picture in result.pictures.items():
            relative = f"images/{number:03d}-{file_slug(result.pair.name)}-{file_slug(column)}.png"
            files.write_atomic(folder / relative, _png(picture))
            pictures[(number, column)] = relative
    plots = {}
    for name, data in (("strength", _strength_plot(evaluation)), ("jpeg", _jpeg_plot(evaluation))):
        if data is not None:
            files.write_atomic(folder / f"plots/{name}.png", data)
            plots[name] = f"plots/{name}.png"
    record = json.dumps(results_record(evaluation), indent=2, allow_nan=False)
    files.write_atomic(folder / "results.json", record.encode("utf-8"))
    files.write_atomic(folder / "results.csv", _csv(evaluation.scores).encode("utf-8"))
    index = folder / "index.html"
    files.write_atomic(index, _html(evaluation, pictures, plots).encode("utf-8"))
    return index


def _named_from(evaluation: Evaluation, root: Path) -> Evaluation:
    """A copy of `evaluation` whose pairs name their files relative to `root`."""
    images = [replace(result, pair=replace(result.pair, original=result.pair.original.relative_to(root),
                                           protected=result.pair.protected.relative_to(root)))
              for result in evaluation.images]
    return replace(evaluation, images=images)


def results_record(evaluation: Evaluation) -> dict:
    """Everything measured, as JSON-ready data."""
    s = evaluation.settings
    return {
        "mist_version": __version__,
        "model": evaluation.model,
        "random_weights": evaluation.random_weights,
        "units_reused": evaluation.finished.reused if evaluation.finished is not None else 0,  # from a stopped run
        "warning": RANDOM_WEIGHTS_WARNING if evaluation.random_weights else None,
        "method": evaluation.method,
        "method_settings": evaluation.scored_with,
        "settings": {"purify": s.purify, "strengths": list(s.strengths), "steps": s.steps, "guidance": s.guidance,
                     "prompt": s.prompt, "seed": s.seed, "ssim_threshold": s.ssim_threshold},
        "verdict_rule": verdict_rule(evaluation),
        "headline": [_finite(h.as_dict()) for h in evaluation.headlines],
        "purifications": [{"name": p.name, "label": p.label} for p in evaluation.purifications],
        "mimicries": [{"name": n, "label": label, "strength": strength} for n, label, strength in evaluation.mimicries],
        "skipped": evaluation.skipped,
        "unmatched": evaluation.unmatched,
        "images": [{"name": r.pair.name, "original": str(r.pair.original), "protected": str(r.pair.protected),
                    "matched_by": r.pair.matched_by, "size": list(r.size), "invisibility": _finite(r.invisibility),
                    "verdict": r.verdict} for r in evaluation.images],
        "scores": [_finite(s.as_dict()) for s in evaluation.scores],
        "worst_case": [_finite(s.as_dict()) for s in evaluation.worst],
        "clip_tower": evaluation.clip_tower,
        "sets": [_finite(s.as_dict()) for s in evaluation.sets],
        "seconds": evaluation.seconds,
    }


def verdict_rule(evaluation: Evaluation) -> str:
    """How the verdicts were reached, in words (the thresholds are measured in the run, not chosen)."""
    bound = evaluation.settings.ssim_threshold
    fixed = f", and below the fixed bound {bound:.2f} (--ssim-threshold)" if bound is not None else ""
    return ("The protection holds for an image, purification and mimicry when the SSIM between the mimicry outputs "
            "of the protected and of the clean image (same purification, same seed) is below two references measured "
            "on the same image in this run: the SSIM between two mimicries of the clean image with different seeds "
            "(the mimicry's own randomness), and the SSIM between the mimicries of the clean image and of the clean "
            f"image plus random noise as large as the protection (same seed){fixed}. Effect = the first reference "
            "minus the SSIM: above 0, the protection changes the mimicry more than chance does. The headline takes, "
            "per image, the purification that left the least effect, and gives the mean effect over images with a "
            f"{CONFIDENCE:.0%} bootstrap interval ({BOOTSTRAP_DRAWS} resamplings of the images): it holds where the "
            "interval lies above 0 and most images held, is broken where it lies below 0, and is unclear otherwise. "
            "Each image was mimicked with one pair of seeds, so the interval covers the images, not more seeds.")


def headline_lines(evaluation: Evaluation) -> list[str]:
    """The answer first, one plain line per mimicry: does mimicry of these images still work after the strongest
    purifier tried?"""
    labels = {p.name: p.label for p in evaluation.purifications}
    mimicries = {name: label for name, label, _ in evaluation.mimicries}
    lines = []
    for h in evaluation.headlines:
        after = f"after the strongest purifier tried ({labels.get(h.worst, h.worst)})"
        interval = f" [{h.low:+.3f}, {h.high:+.3f}]" if h.images > 1 else ""
        answer = {"holds": "the protection holds: mimicry of these images is disrupted beyond its own randomness",
                  "broken": "the protection is broken: the mimicry works as on the originals",
                  "unclear": "unclear: the protection's effect is within the mimicry's own randomness"}[h.decision]
        lines.append(f"{mimicries.get(h.mimicry, h.mimicry)}, {after}: {answer} (effect {h.effect:+.3f}{interval}; "
                     f"{h.held} of {h.images} image(s) held)")
    return lines


def _finite(record: dict) -> dict:
    """JSON has no infinity or NaN: such values (the PSNR of identical images) become null."""
    return {k: (None if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))) else v)
            for k, v in record.items()}


def _csv(scores: list[Score]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    head = ("image", "purification", "mimicry", "strength") + SCORE_COLUMNS
    writer.writerow(head)
    for s in scores:
        row = s.as_dict()
        writer.writerow(["" if row[c] is None else row[c] for c in head])
    return buffer.getvalue()


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def file_slug(text: str) -> str:
    """`text` as a safe file-name part (at most 60 characters of letters, digits, '.', '_' and '-')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def new_figure():
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state

    return Figure(figsize=(9, 3.6), dpi=100)


def figure_png(figure, laid_out: bool = False) -> bytes:
    buffer = io.BytesIO()
    if not laid_out:
        figure.tight_layout()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _strength_plot(evaluation: Evaluation) -> bytes | None:
    """Mean SSIM and mean target pull over images versus img2img strength, a line per purification."""
    strengths = sorted({s.strength for s in evaluation.scores if s.strength is not None})
    if not strengths:
        return None
    figure = new_figure()
    axes = figure.subplots(1, 2)
    for purification in evaluation.purifications:
        own = [s for s in evaluation.scores if s.purification == purification.name and s.strength is not None]
        ssim = [_mean([s.ssim for s in own if s.strength == k]) for k in strengths]
        pull = [_mean([s.target_pull for s in own if s.strength == k and s.target_pull is not None])
                for k in strengths]
        style = dict(marker=MARKERS[len(axes[0].lines) % len(MARKERS)], alpha=0.85, label=purification.label)
        axes[0].plot(strengths, ssim, **style)  # a marker of its own per line: overlapping lines stay apart
        axes[1].plot(strengths, pull, **style)
    _bound(axes[0], evaluation)
    axes[0].set(xlabel="img2img strength", ylabel="SSIM, protected vs clean output",
                title="Likeness of the mimicries (lower: holds)")
    axes[1].set(xlabel="img2img strength", ylabel="target pull",
                title="Pull toward the target (1: as close as it gets)")
    handles, names = axes[1].get_legend_handles_labels()
    figure.legend(handles, names, fontsize=8, loc="lower center", ncol=min(4, len(names)), frameon=False)
    figure.tight_layout(rect=(0, 0.12, 1, 1))  # the legend below both plots, covering neither
    return figure_png(figure, laid_out=True)


def _bound(axes, evaluation: Evaluation) -> None:
    """The mean noise floor (dashed), and a fixed --ssim-threshold where one was given (dotted)."""
    floors = [s.floor_ssim for s in evaluation.scores if s.floor_ssim is not None]
    if floors:
        axes.axhline(_mean(floors), color="grey", linestyle="--", linewidth=1)
    if evaluation.settings.ssim_threshold is not None:
        axes.axhline(evaluation.settings.ssim_threshold, color="grey", linestyle=":", linewidth=1)


def _jpeg_plot(evaluation: Evaluation) -> bytes | None:
    """Mean SSIM over images versus JPEG quality (no purification drawn as quality 100), a line per mimicry."""
    qualities = sorted(p.value for p in evaluation.purifications if p.kind == "jpeg" and p.value is not None)
    if not qualities:
        return None
    figure = new_figure()
    axes = figure.subplots(1, 1)
    for name, label, _ in evaluation.mimicries:
        points = [(q, _mean([s.ssim for s in evaluation.scores
                             if s.mimicry == name and s.purification == f"jpeg:{q:g}"])) for q in qualities]
        points.append((100.0, _mean([s.ssim for s in evaluation.scores
                                     if s.mimicry == name and s.purification == "none"])))
        points.sort()
        axes.plot([q for q, _ in points], [v for _, v in points], marker="o", label=label)
    _bound(axes, evaluation)
    axes.set(xlabel="JPEG quality (100: not compressed)", ylabel="SSIM, protected vs clean output",
             title="Protection versus JPEG compression (lower: protection holds)")
    handles, names = axes.get_legend_handles_labels()
    figure.legend(handles, names, fontsize=8, loc="lower center", ncol=min(4, len(names)), frameon=False)
    figure.tight_layout(rect=(0, 0.12, 1, 1))  # the legend below the plot, covering no line
    return figure_png(figure, laid_out=True)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.warning { background: #fde2e1; border: 2px solid #c0392b; padding: .8em; font-weight: bold; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
.scroll { overflow-x: auto; max-width: 100%; }
th { font-weight: 600; max-width: 11em; } p.path { font-size: 12px; color: #555; overflow-wrap: anywhere; }
.grid { display: grid; gap: 6px; margin-bottom: 1em; }
.grid figure { margin: 0; } .grid img { width: 100%; image-rendering: auto; display: block; }
.grid figcaption { font-size: 11px; text-align: center; }
.holds { color: #1e7d32; } .broken { color: #c0392b; }
"""


def _html(evaluation: Evaluation, pictures: dict, plots: dict) -> str:
    e = html.escape
    s = evaluation.settings
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Mist evaluation</title>"
             "<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<style>{_STYLE}</style></head><body><h1>Mist evaluation</h1>"]
    if evaluation.random_weights:
        parts.append(f"<p class='warning'>{e(RANDOM_WEIGHTS_WARNING)}</p>")
    parts.append(
        f"<p>Model <b>{e(evaluation.model)}</b>; scored with method <b>{e(evaluation.method)}</b>; "
        f"{len(evaluation.images)} image(s); img2img: DDIM {s.steps} steps, guidance {s.guidance:g}, prompt "
        f"&ldquo;{e(s.prompt)}&rdquo;, seed {s.seed}; Mist {e(__version__)}; {evaluation.seconds:.0f} s.</p>"
        f"<p><b>Verdict rule:</b> {e(verdict_rule(evaluation))} Target pull: 0 = the protected image's mimicry is as "
        "far from the target pattern as the clean image's, 1 = as close as the target pattern's own mimicry.</p>")
    if evaluation.headlines:
        parts.insert(2 if evaluation.random_weights else 1, "<h2>The answer</h2><ul>" + "".join(
            f"<li class='{'holds' if h.decision == 'holds' else 'broken'}'><b>{e(line)}</b></li>"
            for h, line in zip(evaluation.headlines, headline_lines(evaluation), strict=True)) + "</ul>")
    if evaluation.skipped or evaluation.unmatched:
        parts.append("<h2>Not run</h2><ul>" + "".join(f"<li>{e(line)}</li>"
                                                       for line in evaluation.skipped + evaluation.unmatched) + "</ul>")
    if plots:
        parts.append("<h2>Plots</h2>" + "".join(f"<p><img src='{e(src)}' alt='{e(name)} plot'></p>"
                                                for name, src in plots.items()))
    parts.append("<h2>Worst case over purifications</h2><p>For each image and mimicry, the purification after which "
                 "the mimicry of the protected image came closest to that of the original.</p>"
                 + _score_table(evaluation.worst, evaluation, with_image=True))
    parts.append(_set_table(evaluation))
    for number, result in enumerate(evaluation.images):
        parts.append(_image_section(number, result, evaluation, pictures))
    parts.append("</body></html>")
    return "\n".join(parts)


def _image_section(number: int, result, evaluation: Evaluation, pictures: dict) -> str:
    e = html.escape
    holds = result.verdict.startswith("protection survived")
    inv = "".join(f"<th>{e(INVISIBILITY_LABELS.get(k, k))}</th>" for k in result.invisibility)
    values = "".join(f"<td>{_readable(v)}</td>" for v in result.invisibility.values())
    columns = ["clean", "protected"] + [p.name for p in evaluation.purifications if p.kind != "none"]
    captions = {"clean": "clean", "protected": "protected"} | {p.name: p.label for p in evaluation.purifications}
    rows = [[(column, captions[column]) for column in columns]]
    for name, label, _ in evaluation.mimicries:
        row = [(f"{name} clean", f"{label}: clean"), (f"{name} none", f"{label}: protected")]
        row += [(f"{name} {p.name}", f"{label}: {p.label}") for p in evaluation.purifications if p.kind != "none"]
        rows.append(row)
    grid = []
    for row in rows:
        cells = "".join(f"<figure><img src='{e(pictures[(number, key)])}' alt='{e(caption)}'><figcaption>"
                        f"{e(caption)}</figcaption></figure>" for key, caption in row if (number, key) in pictures)
        grid.append(f"<div class='grid' style='grid-template-columns: repeat({len(row)}, 1fr)'>{cells}</div>")
    own = [s for s in evaluation.scores if s.image == result.pair.name]
    return (f"<h2>{e(result.pair.name)}</h2><p class='{'holds' if holds else 'broken'}'><b>{e(result.verdict)}</b>"
            f"</p><p class='path'>{e(str(result.pair.original))} &rarr; {e(str(result.pair.protected))} (matched by "
            f"{e(result.pair.matched_by)}, evaluated at {result.size[0]} x {result.size[1]})</p>"
            f"<table><tr>{inv}</tr><tr>{values}</tr></table>{''.join(grid)}{_score_table(own, evaluation)}")


def _score_table(scores: list[Score], evaluation: Evaluation, *, with_image: bool = False) -> str:
    """The verdict and the readable scores per purification and mimicry (the image too, in the worst-case table)."""
    e = html.escape
    labels = {p.name: p.label for p in evaluation.purifications}
    mimicries = {name: label for name, label, _ in evaluation.mimicries}
    names = (["Image"] if with_image else []) + ["Purification", "Mimicry"] + [title for _, title in PAGE_COLUMNS]
    head = "".join(f"<th class='l'>{e(name)}</th>" if n < 2 + with_image else f"<th>{e(name)}</th>"
                   for n, name in enumerate(names))
    body = []
    for s in scores:
        row = s.as_dict()
        cells = [f"<td class='l'>{e(s.image)}</td>"] if with_image else []
        cells += [f"<td class='l'>{e(labels.get(s.purification, s.purification))}</td>",
                  f"<td class='l'>{e(mimicries.get(s.mimicry, s.mimicry))}</td>"]
        for column, _ in PAGE_COLUMNS:
            value = row[column]
            if isinstance(value, bool):
                cells.append(f"<td class='{'holds' if value else 'broken'}'><b>{'yes' if value else 'no'}</b></td>")
            else:
                cells.append(f"<td>{_readable(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<div class='scroll'><table><tr>{head}</tr>{''.join(body)}</table></div>"
            "<p class='path'>Every number, the method's losses and the distances to the target included, is in "
            "results.csv and results.json.</p>")


def _set_table(evaluation: Evaluation) -> str:
    """CMMD and the mean BRISQUE / NIQE per purification and mimicry, where any of them was measured."""
    e = html.escape
    measured = [s.as_dict() for s in evaluation.sets]
    if not any(row[column] is not None for row in measured for column, _ in SET_COLUMNS):
        return ""
    labels = {p.name: p.label for p in evaluation.purifications}
    mimicries = {name: label for name, label, _ in evaluation.mimicries}
    head = "<th class='l'>Purification</th><th class='l'>Mimicry</th>" + "".join(f"<th>{e(title)}</th>"
                                                                                 for _, title in SET_COLUMNS)
    body = "".join(f"<tr><td class='l'>{e(labels.get(row['purification'], row['purification']))}</td><td class='l'>"
                   f"{e(mimicries.get(row['mimicry'], row['mimicry']))}</td>"
                   + "".join(f"<td>{_readable(row[column])}</td>" for column, _ in SET_COLUMNS) + "</tr>"
                   for row in measured)
    tower = f" CLIP tower: {e(evaluation.clip_tower)}." if evaluation.clip_tower else ""
    return (f"<h2>Over the whole set</h2><p>How the set of protected images' mimicries differs from the clean one's, "
            f"and how natural each set looks (no-reference quality).{tower}</p>"
            f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>")


def _readable(value: float | None) -> str:
    """A number as a person reads it: two decimals for the 0..1 scores, thousands grouped for large ones, no
    exponent; empty for none."""
    if value is None or value != value:
        return ""
    if value in (float("inf"), float("-inf")):
        return "&infin;" if value > 0 else "-&infin;"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.1e}"
