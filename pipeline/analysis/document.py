"""A small document model for the report, rendered to Markdown and to self-contained HTML,
and the number formats its tables use."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path


class Doc:
    def __init__(self, root: Path) -> None:
        self.root = root  # where the images are
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", list(header), [list(r) for r in rows]))

    def img(self, file: str, alt: str) -> None:
        self.blocks.append(("img", file, alt))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif b[0] == "table":
                rows = [b[1], ["---"] * len(b[1]), *b[2]]
                out.append("\n".join("| " + " | ".join(r) + " |" for r in rows))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
        return "\n\n".join(out) + "\n"

    @staticmethod
    def _inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)

    def html(self, title: str) -> str:
        out = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title><style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;"
            "font-size:14px}table{border-collapse:collapse;font-size:12px}td,th{border:1px "
            "solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}"
            "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}</style>"
            "</head><body>"
        ]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{self._inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{self._inline(b[1])}</p>")
            elif b[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{self._inline(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{self._inline(c)}</th>" for c in b[1])
                body = "".join("<tr>" + "".join(f"<td>{self._inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
                out.append(f"<table><tr>{head}</tr>{body}</table>")
            elif b[0] == "img":  # inlined, so the page is whole wherever it is opened
                data = base64.b64encode((self.root / b[1]).read_bytes()).decode()
                out.append(f"<p><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'></p>")
        return "\n".join(out) + "</body></html>\n"


def fmt(x: float, digits: int = 4) -> str:
    """Counts (integral, >= 100) exactly with thousands separators; else `digits` decimals
    below 1000 and none above."""
    if x is None or not math.isfinite(x):
        return "—"
    if float(x).is_integer() and abs(x) >= 100:
        return f"{int(x):,}"
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:,.0f}"


def fmt_stat(mean: float, std: float, digits: int = 4) -> str:
    """mean ± std; the std is left out when there is one seed or the seeds agree exactly."""
    if not math.isfinite(mean):
        return "—"
    return fmt(mean, digits) + (f" ± {fmt(std, digits)}" if math.isfinite(std) and std > 0 else "")


def fmt_ci(e) -> str:
    if not math.isfinite(e.estimate):
        return "—"
    ci = f" [{e.ci_low:+.4f}, {e.ci_high:+.4f}]" if math.isfinite(e.ci_low) else " (no CI)"
    return f"{e.estimate:+.4f}{ci}"
