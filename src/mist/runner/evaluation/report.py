"""The evaluation report: REPORT_DIR/index.html, and index.zh.html in Chinese (each opens in a browser from disk, no
server: its pictures and plots are files beside it), results.json (everything measured) and results.csv (one row per
image x purification x mimicry).
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
from mist.runner.evaluation.scores import BOOTSTRAP_DRAWS, CONFIDENCE, Score, verdict
from mist.runner.evaluation.words import mimicry_label, purification_label, word

if TYPE_CHECKING:
    from PIL import Image

    from mist.runner.evaluation.run import Evaluation

RANDOM_WEIGHTS_WARNING = word("en", "random_weights")
SCORE_COLUMNS = ("rmse_levels", "ssim", "latent_mse", "target_pull", "target_mse_protected", "target_mse_clean",
                 "target_mse_reference", "loss_clean", "loss_protected", "floor_ssim", "control_ssim", "effect",
                 "holds", "clip_similarity")
# What the page's score tables show (named in `words`, "col_" + the field, in words an artist reads), the verdict
# first; every number, the method's losses and the target distances included, is in results.csv and results.json.
PAGE_COLUMNS = ("holds", "ssim", "floor_ssim", "control_ssim", "effect", "rmse_levels", "target_pull",
                "clip_similarity")
# The whole-set numbers (`scores.SetScore`; named "set_" + the field): CMMD and the no-reference quality of the outputs.
SET_COLUMNS = ("cmmd", "brisque_clean", "brisque_protected", "niqe_clean", "niqe_protected", "clip_iqa_clean",
               "clip_iqa_protected")
PAGES = {"en": "index.html", "zh": "index.zh.html"}  # the report's page in each language, each linking to the other


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
    for lang, page in PAGES.items():
        files.write_atomic(folder / page, _html(evaluation, pictures, plots, lang).encode("utf-8"))
    return folder / PAGES["en"]


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


def verdict_rule(evaluation: Evaluation, lang: str = "en") -> str:
    """How the verdicts were reached, in words (the thresholds are measured in the run, not chosen)."""
    bound = evaluation.settings.ssim_threshold
    fixed = word(lang, "fixed_bound", bound=f"{bound:.2f}") if bound is not None else ""
    return word(lang, "rule", fixed=fixed, confidence=f"{CONFIDENCE:.0%}", draws=BOOTSTRAP_DRAWS)


def headline_lines(evaluation: Evaluation, lang: str = "en") -> list[str]:
    """The answer first, one plain line per mimicry in `lang`: does mimicry of these images still work after the
    strongest purifier tried?"""
    labels, mimicries = _labels(evaluation, lang)
    lines = []
    for h in evaluation.headlines:
        interval = f" [{h.low:+.3f}, {h.high:+.3f}]" if h.images > 1 else ""
        lines.append(word(lang, "headline", mimicry=mimicries.get(h.mimicry, h.mimicry),
                          after=word(lang, "after_worst", purifier=labels.get(h.worst, h.worst)),
                          answer=word(lang, h.decision), effect=f"{h.effect:+.3f}", interval=interval, held=h.held,
                          images=h.images))
    return lines


def image_verdict(evaluation: Evaluation, result, lang: str = "en") -> str:
    """The verdict line of one image (`ImageResult`) in `lang` (results.json keeps the English one)."""
    if lang == "en":
        return result.verdict
    own = [s for s in evaluation.scores if s.image == result.pair.name]
    return verdict(own, _labels(evaluation, lang)[0], result.invisibility.get("linf_levels") == 0, lang)


def _labels(evaluation: Evaluation, lang: str) -> tuple[dict[str, str], dict[str, str]]:
    """The purifications' and the mimicries' human names in `lang`, by name."""
    return ({p.name: purification_label(p.kind, p.value, p.label, lang) for p in evaluation.purifications},
            {name: mimicry_label(name, label, lang) for name, label, _ in evaluation.mimicries})


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
p.lang { float: right; margin: 0; } details summary { cursor: pointer; margin: .3em 0; }
img { max-width: 100%; } li, p { overflow-wrap: anywhere; }
@media (max-width: 700px) {  /* a phone: three pictures a row, not every column squeezed into one */
  body { margin: .6em; } .grid { grid-template-columns: repeat(3, 1fr) !important; }
}
"""


def _html(evaluation: Evaluation, pictures: dict, plots: dict, lang: str) -> str:
    e = html.escape
    s = evaluation.settings
    other = "zh" if lang == "en" else "en"
    parts = [f"<!doctype html><html lang='{lang}'><head><meta charset='utf-8'><title>{e(word(lang, 'title'))}</title>"
             "<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<style>{_STYLE}</style></head><body><p class='lang'><a href='{PAGES[other]}' hreflang='{other}'>"
             f"{e(word(lang, 'other_language'))}</a></p><h1>{e(word(lang, 'title'))}</h1>"]
    if evaluation.random_weights:
        parts.append(f"<p class='warning'>{e(word(lang, 'random_weights'))}</p>")
    if evaluation.headlines:
        parts.append(f"<h2>{e(word(lang, 'answer'))}</h2><ul>" + "".join(
            f"<li class='{'holds' if h.decision == 'holds' else 'broken'}'><b>{e(line)}</b></li>"
            for h, line in zip(evaluation.headlines, headline_lines(evaluation, lang), strict=True)) + "</ul>")
    setup = word(lang, "setup", model=e(evaluation.model), method=e(evaluation.method), images=len(evaluation.images),
                 steps=s.steps, guidance=f"{s.guidance:g}", prompt=e(s.prompt), seed=s.seed, version=e(__version__),
                 seconds=f"{evaluation.seconds:.0f}")
    parts.append(f"<p>{setup}</p><p><b>{e(word(lang, 'verdict_rule_heading'))}</b> "
                 f"{e(verdict_rule(evaluation, lang))} {e(word(lang, 'target_pull_note'))}</p>")
    if evaluation.skipped or evaluation.unmatched:
        parts.append(f"<h2>{e(word(lang, 'not_run'))}</h2><ul>"
                     + "".join(f"<li>{e(line)}</li>" for line in evaluation.skipped + evaluation.unmatched) + "</ul>")
    if plots:
        parts.append(f"<h2>{e(word(lang, 'plots'))}</h2><p>{e(word(lang, 'plots_note'))}</p>"
                     + "".join(f"<p><img src='{e(src)}' alt='{e(name)} plot'></p>" for name, src in plots.items()))
    parts.append(f"<h2>{e(word(lang, 'worst_heading'))}</h2><p>{e(word(lang, 'worst_note'))}</p>"
                 + _score_table(evaluation.worst, evaluation, lang, with_image=True))
    parts.append(_set_table(evaluation, lang))
    for number, result in enumerate(evaluation.images):
        parts.append(_image_section(number, result, evaluation, pictures, lang))
    parts.append("</body></html>")
    return "\n".join(parts)


def _named(lang: str, prefix: str, key: str) -> str:
    """A column's name in `lang` (`words`' prefix + key), or the key itself where it has none."""
    from mist.runner.evaluation.words import TEXTS

    return word(lang, prefix + key) if prefix + key in TEXTS["en"] else key


def _image_section(number: int, result, evaluation: Evaluation, pictures: dict, lang: str) -> str:
    e = html.escape
    own = [s for s in evaluation.scores if s.image == result.pair.name]
    holds = bool(own) and all(s.holds for s in own)
    inv = "".join(f"<th>{e(_named(lang, 'inv_', k))}</th>" for k in result.invisibility)
    values = "".join(f"<td>{_readable(v)}</td>" for v in result.invisibility.values())
    labels, mimicries = _labels(evaluation, lang)
    clean, protected = word(lang, "clean"), word(lang, "protected")
    purified = [p.name for p in evaluation.purifications if p.kind != "none"]
    rows = [[("clean", clean), ("protected", protected)] + [(name, labels[name]) for name in purified]]
    for name, label in mimicries.items():
        rows.append([(f"{name} clean", f"{label}: {clean}"), (f"{name} none", f"{label}: {protected}")]
                    + [(f"{name} {p}", f"{label}: {labels[p]}") for p in purified])
    grid = []
    for row in rows:
        cells = "".join(f"<figure><img src='{e(pictures[(number, key)])}' alt='{e(caption)}'><figcaption>"
                        f"{e(caption)}</figcaption></figure>" for key, caption in row if (number, key) in pictures)
        grid.append(f"<div class='grid' style='grid-template-columns: repeat({len(row)}, 1fr)'>{cells}</div>")
    matched = word(lang, "matched", original=e(str(result.pair.original)), protected=e(str(result.pair.protected)),
                   matched_by=e(result.pair.matched_by), width=result.size[0], height=result.size[1])
    return (f"<h2>{e(result.pair.name)}</h2><p class='{'holds' if holds else 'broken'}'>"
            f"<b>{e(image_verdict(evaluation, result, lang))}</b></p><p class='path'>{matched}</p>"
            f"<div class='scroll'><table><tr>{inv}</tr><tr>{values}</tr></table></div>{''.join(grid)}"
            f"<details><summary>{e(word(lang, 'all_scores'))}</summary>{_score_table(own, evaluation, lang)}"
            "</details>")


def _score_table(scores: list[Score], evaluation: Evaluation, lang: str, *, with_image: bool = False) -> str:
    """The verdict and the readable scores per purification and mimicry (the image too, in the worst-case table)."""
    e = html.escape
    labels, mimicries = _labels(evaluation, lang)
    names = ([word(lang, "image")] if with_image else []) + [word(lang, "purification"), word(lang, "mimicry")]
    head = "".join(f"<th class='l'>{e(name)}</th>" for name in names)
    head += "".join(f"<th>{e(word(lang, 'col_' + column))}</th>" for column in PAGE_COLUMNS)
    body = []
    for s in scores:
        row = s.as_dict()
        cells = [f"<td class='l'>{e(s.image)}</td>"] if with_image else []
        cells += [f"<td class='l'>{e(labels.get(s.purification, s.purification))}</td>",
                  f"<td class='l'>{e(mimicries.get(s.mimicry, s.mimicry))}</td>"]
        for column in PAGE_COLUMNS:
            value = row[column]
            if isinstance(value, bool):
                answer = e(word(lang, "yes" if value else "no"))
                cells.append(f"<td class='{'holds' if value else 'broken'}'><b>{answer}</b></td>")
            else:
                cells.append(f"<td>{_readable(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<div class='scroll'><table><tr>{head}</tr>{''.join(body)}</table></div>"
            f"<p class='path'>{e(word(lang, 'raw_note'))}</p>")


def _set_table(evaluation: Evaluation, lang: str) -> str:
    """CMMD and the mean BRISQUE / NIQE per purification and mimicry, where any of them was measured."""
    e = html.escape
    measured = [s.as_dict() for s in evaluation.sets]
    if not any(row[column] is not None for row in measured for column in SET_COLUMNS):
        return ""
    labels, mimicries = _labels(evaluation, lang)
    head = (f"<th class='l'>{e(word(lang, 'purification'))}</th><th class='l'>{e(word(lang, 'mimicry'))}</th>"
            + "".join(f"<th>{e(word(lang, 'set_' + column))}</th>" for column in SET_COLUMNS))
    body = "".join(f"<tr><td class='l'>{e(labels.get(row['purification'], row['purification']))}</td><td class='l'>"
                   f"{e(mimicries.get(row['mimicry'], row['mimicry']))}</td>"
                   + "".join(f"<td>{_readable(row[column])}</td>" for column in SET_COLUMNS) + "</tr>"
                   for row in measured)
    tower = e(word(lang, "clip_tower", tower=evaluation.clip_tower)) if evaluation.clip_tower else ""
    return (f"<h2>{e(word(lang, 'set_heading'))}</h2><p>{e(word(lang, 'set_note'))}{tower}</p>"
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
