"""What every report afina writes shares: blocks rendered as Markdown or HTML, and charts drawn to PNG bytes.

The trainer's run report, and the sections later stages splice into it (the exporter's export and
fidelity section, the evaluator's evaluation section), are built from the same
blocks — ``("text", str)``, ``("table", headers, rows)``, ``("images", [(alt, file name)])`` —
so they read alike and a cell means the same in both formats. matplotlib is imported only
when a chart is drawn (the services that draw depend on it; afina.core does not).
"""

from __future__ import annotations

import base64
import html
import io
import logging
from typing import TYPE_CHECKING, Any

from afina.core.logging import log_event
from afina.core.report_pdf import REPORT_PDF, report_pdf

if TYPE_CHECKING:
    from afina.core.artifacts import FileEntry
    from afina.core.store import ArtifactStore

log = logging.getLogger("afina.reports")
Block = tuple[Any, ...]
DPI = 110


def pyplot() -> Any:
    """matplotlib's pyplot on the off-screen Agg backend (a worker has no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png(figure: Any, dpi: int = DPI) -> bytes:
    """``figure`` as PNG bytes, closed afterwards; no software stamp, so the same chart gives the same bytes."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    pyplot().close(figure)
    return buffer.getvalue()


def markdown_cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def html_inline(text: object) -> str:
    """Escape, then show `code` spans the way the Markdown does."""
    parts = html.escape(str(text)).split("`")
    return "".join(f"<code>{part}</code>" if index % 2 else part for index, part in enumerate(parts))


def markdown_blocks(blocks: list[Block], image_prefix: str = "") -> list[str]:
    """The blocks as Markdown lines; images link to ``image_prefix + file name``."""
    lines: list[str] = []
    for block in blocks:
        if block[0] == "text":
            lines += [block[1], ""]
        elif block[0] == "table":
            _, headers, rows = block
            lines.append("| " + " | ".join(markdown_cell(h) for h in headers) + " |")
            lines.append("| " + " | ".join("---" for _ in headers) + " |")
            lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in rows]
            lines.append("")
        elif block[0] == "images":
            for alt, name in block[1]:
                lines += [f"![{alt}]({image_prefix}{name})", ""]
    return lines


def html_blocks(blocks: list[Block], images: dict[str, bytes]) -> list[str]:
    """The blocks as HTML elements; images embedded as base64 PNGs (a report page stands alone)."""
    out: list[str] = []
    for block in blocks:
        if block[0] == "text":
            out.append(f"<p>{html_inline(block[1])}</p>")
        elif block[0] == "table":
            _, headers, rows = block
            out.append("<table><thead><tr>" + "".join(f"<th>{html_inline(h)}</th>" for h in headers)
                       + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{html_inline(cell)}</td>" for cell in row) + "</tr>" for row in rows]
            out.append("</tbody></table>")
        elif block[0] == "images":
            for alt, name in block[1]:
                encoded = base64.b64encode(images[name]).decode()
                out.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'
                           f"<figcaption>{html.escape(alt)}</figcaption></figure>")
    return out


# --- sections that later stages add to a job's report pages (the trainer writes the pages) ----------------------

REPORT_PAGES = {"report.md": False, "report.html": True}  # a job's report pages under report/ (name -> is HTML)
# REPORT_PDF ("report.pdf") sits beside them: rendered from report.html each time that page is written


def section_markers(name: str) -> tuple[str, str]:
    """The comments that delimit a stage's section in a report page, so a later run replaces it in place."""
    return f"<!-- afina:{name}:start -->", f"<!-- afina:{name}:end -->"


def markdown_section(name: str, heading: str, blocks: list[Block], image_prefix: str = "") -> str:
    start, end = section_markers(name)
    return "\n".join([start, f"## {heading}", "", *markdown_blocks(blocks, image_prefix), end]) + "\n"


def html_section(name: str, heading: str, blocks: list[Block], images: dict[str, bytes]) -> str:
    start, end = section_markers(name)
    return "\n".join([start, f"<h2>{html.escape(heading)}</h2>", *html_blocks(blocks, images), end]) + "\n"


def splice_section(page: str, section: str, *, name: str, html_page: bool) -> str:
    """The page with its ``name`` section replaced (a later run of the stage) or added (at the end, before
    ``</body>`` in HTML)."""
    start_marker, end_marker = section_markers(name)
    start, end = page.find(start_marker), page.find(end_marker)
    if start != -1 and end > start:
        return page[:start] + section.rstrip("\n") + page[end + len(end_marker):]
    if html_page and "</body>" in page:
        at = page.rindex("</body>")
        return page[:at] + section + page[at:]
    return page.rstrip("\n") + "\n\n" + section


def splice_report_pages(store: ArtifactStore, report_prefix: str, sections: dict[bool, str], *,
                        name: str) -> dict[str, FileEntry]:
    """Splice a stage's ``name`` section (``sections``: is HTML -> the section) into each of the job's report
    pages under ``report_prefix`` that the trainer wrote, then render ``report.pdf`` again from the spliced HTML
    page; page name -> what was written (the result files to publish). A PDF that cannot be rendered is logged
    and left as it was: the stage goes on."""
    from afina.core.artifacts import FileEntry

    written: dict[str, FileEntry] = {}
    for page, is_html in REPORT_PAGES.items():
        key = f"{report_prefix}/{page}"
        if not store.exists(key):
            continue
        spliced = splice_section(store.get_bytes(key).decode(), sections[is_html], name=name, html_page=is_html)
        written[page] = FileEntry.of(store.put_bytes(key, spliced.encode()))
        if is_html:
            pdf = report_pdf(spliced)
            if pdf is None:
                log_event(log, "report.pdf_not_rewritten", logging.WARNING, key=f"{report_prefix}/{REPORT_PDF}",
                          section=name)
            else:
                written[REPORT_PDF] = FileEntry.of(store.put_bytes(f"{report_prefix}/{REPORT_PDF}", pdf))
    return written
