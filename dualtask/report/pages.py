"""The parts every HTML page of a run or an experiment is made of: the style, tables, embedded figures and a page
that collects them."""
from __future__ import annotations

import base64
import html
from pathlib import Path

FIGURES_STATUS = "figures_status.json"  # what each part of the figures stage wrote, or why it failed

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
img { max-width: 100%; display: block; margin: .8em 0; }
table { border-collapse: collapse; font-size: .9em; margin: .6em 0; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
p.skip { color: #a33; font-style: italic; }
div.answer { background: #f4f7fb; border-left: 4px solid #3a6ea5; padding: .4em 1em .6em; }
div.answer p.verdict { font-size: 1.1em; }
ul.caveats li { margin: .25em 0; }
table.wide { font-size: .78em; } table.wide td { padding: .2em .4em; white-space: nowrap; }
table.wide th { padding: .2em .4em; vertical-align: bottom; }
div.scroll { overflow-x: auto; }
p.what { color: #444; }
details { margin: .5em 0; }
"""


def image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(rows: list, columns: list, wide: bool = False) -> str:
    head = "".join(f"<th>{html.escape(c).replace('_', '_<wbr>')}</th>" for c in columns)  # long names may wrap
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    if wide:
        return f'<div class="scroll"><table class="wide"><tr>{head}</tr>{body}</table></div>'
    return f"<table><tr>{head}</tr>{body}</table>"


def bullets(items: list, css: str = "caveats") -> str:
    return f"<ul class='{css}'>" + "".join(f"<li>{html.escape(t)}</li>" for t in items) + "</ul>"


def document(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


class Page:
    """A page being built: sections, sentences, tables and the figures of a run folder."""

    def __init__(self, run_dir: Path, status: dict):
        self.run_dir = run_dir
        self.status = status  # figures_status.json: the parts of the figures stage that ran, or failed
        self.parts = []

    def failed(self, part: str) -> bool:
        """Say so and return True when a part of the figures stage failed."""
        entry = self.status.get(part)
        if entry and not entry.get("ok", True):
            self.skip(f"{part} failed: {entry.get('error', 'unknown error')} (traceback in {FIGURES_STATUS})")
            return True
        return False

    def section(self, title: str, anchor: str | None = None):
        where = f' id="{html.escape(anchor)}"' if anchor else ""
        self.parts.append(f"<h2{where}>{html.escape(title)}</h2>")

    def what(self, text: str):
        self.parts.append(f'<p class="what">{html.escape(text)}</p>')

    def skip(self, reason: str):
        self.parts.append(f'<p class="skip">Skipped: {html.escape(reason)}</p>')

    def figure(self, name: str, text: str, part: str | None = None) -> bool:
        path = self.run_dir / "figures" / name
        if part and self.failed(part):
            return False
        if not path.exists():
            self.skip(f"figures/{name} is missing (its stage has not run, or its inputs were missing)")
            return False
        self.what(text)
        self.parts.append(image(path, name))
        return True

    def raw(self, markup: str):
        self.parts.append(markup)
