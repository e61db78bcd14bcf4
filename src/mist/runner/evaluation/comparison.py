"""The page, table and plot of `mist compare`: every method at every budget in one table (how visible the protection
is, and its effect on each mimicry after the strongest purifier, with its interval and decision) and a plot per
mimicry of effect against budget, PSNR, SSIM and LPIPS (where measured), each arm linking to its own report."""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from mist.common import files
from mist.runner.evaluation.report import PAGES, RANDOM_WEIGHTS_WARNING, figure_png
from mist.runner.evaluation.words import mimicry_label, purification_label, word
from mist.version import __version__

if TYPE_CHECKING:
    from mist.runner.compare import Comparison

SHOWN = (("psnr_db", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS"))  # invisibility columns, where measured


def write_comparison(comparison: Comparison, folder: Path) -> Path:
    """comparison.json, comparison.csv, a plot per mimicry (effect-MIMICRY.png), index.html and its Chinese twin
    index.zh.html in `folder`; returns index.html's path."""
    random_weights = any(result.random_weights for result in comparison.results)
    record = {"mist_version": __version__, "random_weights": random_weights,
              "warning": RANDOM_WEIGHTS_WARNING if random_weights else None, "settings": comparison.settings,
              "arms": [{"method": r.arm.method, "epsilon": r.arm.epsilon, "report": f"reports/{r.arm.name}/index.html",
                        "invisibility": r.invisibility, "headline": r.headlines,
                        "images_failed": r.protected_failed} for r in comparison.results]}
    files.write_atomic(folder / "comparison.json", json.dumps(record, indent=2, allow_nan=False).encode("utf-8"))
    files.write_atomic(folder / "comparison.csv", _csv(comparison).encode("utf-8"))
    plots = _plots(comparison)
    for name, png in plots.items():
        files.write_atomic(folder / name, png)
    for lang, page in PAGES.items():
        files.write_atomic(folder / page, _page(comparison, random_weights, list(plots), lang).encode("utf-8"))
    return folder / PAGES["en"]


def _rows(comparison: Comparison):
    """One row per arm and mimicry: method, budget, invisibility, and the headline's numbers."""
    for result in comparison.results:
        for headline in result.headlines or [{}]:
            yield result, headline


def _csv(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "epsilon"] + [key for key, _ in SHOWN]
                    + ["mimicry", "worst_purification", "effect", "effect_low", "effect_high", "decision"])
    for result, h in _rows(comparison):
        writer.writerow([result.arm.method, f"{result.arm.epsilon:g}"]
                        + [result.invisibility.get(key, "") for key, _ in SHOWN]
                        + [h.get("mimicry", ""), h.get("worst", ""), h.get("effect", ""), h.get("low", ""),
                           h.get("high", ""), h.get("decision", "")])
    return buffer.getvalue()


# What each plot panel sets the effect against: the budget, then each invisibility measure the arms have.
AXES = (("epsilon", "budget (largest pixel change, 0-255)"),
        ("psnr_db", "PSNR, dB (right: less visible)"),
        ("ssim", "SSIM with the original (right: less visible)"),
        ("lpips", "LPIPS to the original (left: less visible)"))


def _plots(comparison: Comparison) -> dict[str, bytes]:
    """Per mimicry, `effect-MIMICRY.png`: the effect after the strongest purifier (its interval as an error bar, a line
    per method) against the budget and against each invisibility measure the arms have, a panel each; up is more
    protective."""
    from mist.runner.evaluation.report import file_slug

    mimicries = list(dict.fromkeys(h["mimicry"] for r in comparison.results for h in r.headlines))
    return {f"effect-{file_slug(mimicry)}.png": _effect_figure(comparison, mimicry) for mimicry in mimicries}


def _effect_figure(comparison: Comparison, mimicry: str) -> bytes:
    from matplotlib.figure import Figure

    axes = [(key, label) for key, label in AXES
            if key == "epsilon" or any(key in r.invisibility for r in comparison.results)]
    columns = min(2, len(axes))
    rows = -(-len(axes) // columns)
    figure = Figure(figsize=(4.4 * columns, 3.0 * rows + 0.8), dpi=100)
    panels = figure.subplots(rows, columns, squeeze=False).flatten()
    for panel, (key, label) in zip(panels, axes, strict=False):  # a grid may have a panel to spare
        for method in dict.fromkeys(r.arm.method for r in comparison.results):
            points = sorted(((r.arm.epsilon if key == "epsilon" else r.invisibility[key], h, r.arm.epsilon)
                             for r in comparison.results for h in r.headlines
                             if r.arm.method == method and h["mimicry"] == mimicry
                             and (key == "epsilon" or key in r.invisibility)), key=lambda point: point[0])
            if points:
                _draw(panel, points, method, annotate=key != "epsilon")
        panel.axhline(0, color="grey", linestyle="--", linewidth=1)
        panel.set(xlabel=label, ylabel="effect (above 0: protects)")
    for panel in panels[len(axes):]:
        panel.axis("off")
    figure.suptitle(f"{mimicry}: effect after the strongest purifier")
    handles, names = panels[0].get_legend_handles_labels()
    if len(axes) < len(panels):  # the legend in the spare panel's place, covering no line
        panels[-1].legend(handles, names, fontsize=9, loc="center", frameon=False, title="method")
        figure.tight_layout()
    else:
        figure.legend(handles, names, fontsize=8, loc="lower center", ncol=min(5, len(names)), frameon=False)
        figure.tight_layout(rect=(0, 0.4 / (3.0 * rows + 0.8), 1, 1))  # the legend below the panels
    return figure_png(figure, laid_out=True)


def _draw(panel, points, method: str, annotate: bool) -> None:
    """One method's arms as a line of points with error bars; against an invisibility measure, each point is labelled
    with its budget."""
    from mist.runner.evaluation.report import MARKERS

    xs, ys = [p[0] for p in points], [p[1]["effect"] for p in points]
    errors = [[p[1]["effect"] - p[1]["low"] for p in points], [p[1]["high"] - p[1]["effect"] for p in points]]
    marker = MARKERS[len(panel.lines) % len(MARKERS)]
    panel.errorbar(xs, ys, yerr=errors, marker=marker, capsize=3, alpha=0.85, label=method)
    if annotate:
        for x, y, (_, _, epsilon) in zip(xs, ys, points, strict=True):
            panel.annotate(f"{epsilon:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _page(comparison: Comparison, random_weights: bool, plots: list[str], lang: str) -> str:
    e = html.escape
    other = "zh" if lang == "en" else "en"
    parts = [f"<!doctype html><html lang='{lang}'><head><meta charset='utf-8'><title>{e(word(lang, 'cmp_title'))}"
             "</title><meta name='viewport' content='width=device-width, initial-scale=1'>"
             "<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222} table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} th{background:#f2f2f2}"
             ".l{text-align:left} .warning{background:#fde2e1;border:2px solid #c0392b;padding:.8em;"
             "font-weight:bold} .holds{color:#1e7d32} .broken{color:#c0392b} p.lang{float:right;margin:0}</style>"
             f"</head><body><p class='lang'><a href='{PAGES[other]}' hreflang='{other}'>"
             f"{e(word(lang, 'other_language'))}</a></p><h1>{e(word(lang, 'cmp_title'))}</h1>"]
    if random_weights:
        parts.append(f"<p class='warning'>{e(word(lang, 'random_weights'))}</p>")
    parts.append(f"<p>{word(lang, 'cmp_intro')}</p>")
    parts += [f"<p><img src='{e(name)}' alt='{e(name[:-4])}: effect against budget and invisibility' "
              "style='max-width:100%'></p>" for name in plots]
    shown = [(key, label) for key, label in SHOWN if any(key in r.invisibility for r in comparison.results)]
    head = ([word(lang, "cmp_method"), word(lang, "cmp_budget")] + [label for _, label in shown]
            + [word(lang, key) for key in ("mimicry", "cmp_worst", "cmp_effect", "cmp_interval", "cmp_answer")])
    parts.append("<div style='overflow-x:auto'><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    parts += [_row(result, h, shown, lang) for result, h in _rows(comparison)]
    parts.append("</table></div></body></html>")
    return "\n".join(parts)


def _row(result, h: dict, shown: list[tuple[str, str]], lang: str) -> str:
    """One arm and mimicry as a table row in `lang`, linking to the arm's report in that language."""
    from mist.runner.evaluation.purify import parse_purifications

    e = html.escape
    cells = [f"<td class='l'><a href='reports/{e(result.arm.name)}/{PAGES[lang]}'>{e(result.arm.method)}</a></td>",
             f"<td>{result.arm.epsilon:g}</td>"]
    cells += [f"<td>{result.invisibility[key]:.3f}</td>" if key in result.invisibility else "<td></td>"
              for key, _ in shown]
    if not h:
        return "<tr>" + "".join(cells) + f"<td class='l' colspan='5'>{e(word(lang, 'not_measured'))}</td></tr>"
    worst = h["worst"]
    if worst != "none":
        (purification,) = parse_purifications(worst)
        worst = purification_label(purification.kind, purification.value, worst, lang)
    answer = h["decision"]
    cells += [f"<td class='l'>{e(mimicry_label(h['mimicry'], h['mimicry'], lang))}</td>",
              f"<td class='l'>{e(worst)}</td>", f"<td>{h['effect']:+.3f}</td>",
              f"<td>[{h['low']:+.3f}, {h['high']:+.3f}]</td>",
              f"<td class='{'holds' if answer == 'holds' else 'broken'}'><b>{e(word(lang, 'decision_' + answer))}</b>"
              "</td>"]
    return "<tr>" + "".join(cells) + "</tr>"
