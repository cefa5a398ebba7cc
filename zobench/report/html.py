"""index.html: the report on one page (the tables, then each task's plot), for reading in a browser.

Every cell and header is HTML-escaped (pandas' to_html escapes by default; names come from received
metrics.json files), the plots are linked by their relative paths under plots/, and the page is written
through names.write_output (never through a link, never outside the output folder).
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from .names import write_output
from .tables import visible

SECTIONS = [("accuracy", "Test accuracy / F1 (%), mean ± std over seeds, at the setting chosen on dev"),
            ("selection", "The setting chosen on dev per (model, task, method)"),
            ("comparison", "Ours beside the papers' numbers"),
            ("speed", "Forward passes and seconds to the target dev metric"),
            ("cost", "Steps, passes and seconds"), ("memory", "Peak memory"),
            ("failures", "Runs left out of the averages"), ("runs", "Every run found")]

_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:110em}table{border-collapse:collapse;margin-bottom:2em}"
          "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}img{max-width:100%}")


def write_index(out_dir: Path, tables: dict[str, pd.DataFrame], plots: list[Path]) -> Path:
    body = ["<h1>zobench report</h1>",
            "<p>Every table is also in this folder as .md, .tex and .csv.</p>"]
    for name, title in SECTIONS:
        frame = tables.get(name)
        if frame is None:
            continue
        body.append(f"<h2 id=\"{name}\">{html.escape(title)} ({name}.md)</h2>")
        shown = frame.astype(object).map(lambda v: visible(v) if isinstance(v, str) else v)
        body.append("<p>(none)</p>" if frame.empty else shown.to_html(index=False, escape=True, border=0))
    if plots:
        body.append("<h2 id=\"plots\">Plots</h2>")
        for path in plots:
            source = html.escape(f"{path.parent.name}/{path.name}", quote=True)
            body.append(f"<h3>{html.escape(path.stem)}</h3><img src=\"{source}\" alt=\"{html.escape(path.stem)}\">")
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>zobench report</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return write_output(out_dir, "index", ".html", lambda handle: handle.write(page))
