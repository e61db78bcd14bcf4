"""The page, table and plot of `mist compare`: every method at every budget in one table (how visible the protection
is, and its effect on each mimicry after the strongest purifier, with its interval and decision) and one plot per
mimicry of effect against PSNR, each arm linking to its own report."""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from mist.common import files
from mist.runner.evaluation.report import RANDOM_WEIGHTS_WARNING, figure_png, new_figure
from mist.version import __version__

if TYPE_CHECKING:
    from mist.runner.compare import Comparison

SHOWN = (("psnr_db", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS"))  # invisibility columns, where measured


def write_comparison(comparison: Comparison, folder: Path) -> Path:
    """comparison.json, comparison.csv, effect.png and index.html in `folder`; returns index.html's path."""
    random_weights = any(result.random_weights for result in comparison.results)
    record = {"mist_version": __version__, "random_weights": random_weights,
              "warning": RANDOM_WEIGHTS_WARNING if random_weights else None, "settings": comparison.settings,
              "arms": [{"method": r.arm.method, "epsilon": r.arm.epsilon, "report": f"reports/{r.arm.name}/index.html",
                        "invisibility": r.invisibility, "headline": r.headlines,
                        "images_failed": r.protected_failed} for r in comparison.results]}
    files.write_atomic(folder / "comparison.json", json.dumps(record, indent=2, allow_nan=False).encode("utf-8"))
    files.write_atomic(folder / "comparison.csv", _csv(comparison).encode("utf-8"))
    plot = _plot(comparison)
    if plot is not None:
        files.write_atomic(folder / "effect.png", plot)
    index = folder / "index.html"
    files.write_atomic(index, _page(comparison, random_weights, plot is not None).encode("utf-8"))
    return index


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


def _plot(comparison: Comparison) -> bytes | None:
    """Effect after the strongest purifier against PSNR, a point per arm (its interval as an error bar), a panel per
    mimicry: up is more protective, right is less visible."""
    mimicries = list(dict.fromkeys(h["mimicry"] for r in comparison.results for h in r.headlines))
    if not mimicries or not any("psnr_db" in r.invisibility for r in comparison.results):
        return None
    figure = new_figure()
    panels = figure.subplots(1, len(mimicries), squeeze=False)[0]
    methods = list(dict.fromkeys(r.arm.method for r in comparison.results))
    for panel, mimicry in zip(panels, mimicries, strict=True):
        for method in methods:
            points = [(r.invisibility["psnr_db"], h, r.arm.epsilon) for r in comparison.results
                      for h in r.headlines if r.arm.method == method and h["mimicry"] == mimicry
                      and "psnr_db" in r.invisibility]
            if not points:
                continue
            xs, ys = [p[0] for p in points], [p[1]["effect"] for p in points]
            errors = [[p[1]["effect"] - p[1]["low"] for p in points], [p[1]["high"] - p[1]["effect"] for p in points]]
            panel.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
            for x, y, (_, _, epsilon) in zip(xs, ys, points, strict=True):
                panel.annotate(f"{epsilon:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        panel.axhline(0, color="grey", linestyle="--", linewidth=1)
        panel.set(xlabel="PSNR of the protected image (dB, right: less visible)",
                  ylabel="effect after the strongest purifier", title=mimicry)
    handles, names = panels[0].get_legend_handles_labels()
    figure.legend(handles, names, fontsize=8, loc="lower center", ncol=min(4, len(names)), frameon=False)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    return figure_png(figure, laid_out=True)


def _page(comparison: Comparison, random_weights: bool, with_plot: bool) -> str:
    e = html.escape
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Mist comparison</title>"
             "<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222} table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} th{background:#f2f2f2}"
             ".l{text-align:left} .warning{background:#fde2e1;border:2px solid #c0392b;padding:.8em;"
             "font-weight:bold} .holds{color:#1e7d32} .broken{color:#c0392b}</style></head><body>"
             "<h1>Methods and budgets side by side</h1>"]
    if random_weights:
        parts.append(f"<p class='warning'>{e(RANDOM_WEIGHTS_WARNING)}</p>")
    parts.append("<p>Each method protected your images at each budget (the largest change of a pixel, 0-255), and "
                 "each protected set was evaluated as <code>mist evaluate</code> does. <b>Effect</b>: how much more "
                 "the mimicry of the protected images differs from that of the originals than two mimicries of the "
                 "originals differ from each other, after the strongest purifier tried (above 0: the protection "
                 "works beyond chance; the interval is a 95% bootstrap over your images). Higher PSNR and SSIM: less "
                 "visible. Each row links to its full report.</p>")
    if with_plot:
        parts.append("<p><img src='effect.png' alt='effect against PSNR' style='max-width:100%'></p>")
    shown = [(key, label) for key, label in SHOWN if any(key in r.invisibility for r in comparison.results)]
    head = ["Method", "Budget"] + [label for _, label in shown] + ["Mimicry", "Strongest purifier", "Effect",
                                                                   "Interval", "Answer"]
    parts.append("<div style='overflow-x:auto'><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    for result, h in _rows(comparison):
        cells = [f"<td class='l'><a href='reports/{e(result.arm.name)}/index.html'>{e(result.arm.method)}</a></td>",
                 f"<td>{result.arm.epsilon:g}</td>"]
        cells += [f"<td>{result.invisibility[key]:.3f}</td>" if key in result.invisibility else "<td></td>"
                  for key, _ in shown]
        if h:
            answer = h["decision"]
            cells += [f"<td class='l'>{e(h['mimicry'])}</td>", f"<td class='l'>{e(h['worst'])}</td>",
                      f"<td>{h['effect']:+.3f}</td>", f"<td>[{h['low']:+.3f}, {h['high']:+.3f}]</td>",
                      f"<td class='{'holds' if answer == 'holds' else 'broken'}'><b>{e(answer)}</b></td>"]
        else:
            cells += ["<td class='l' colspan='5'>not measured</td>"]
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table></div></body></html>")
    return "\n".join(parts)
