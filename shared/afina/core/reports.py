"""What every report afina writes shares: blocks rendered as Markdown or HTML, and charts drawn to PNG bytes.

The trainer's run report and the evaluator's evaluation section are built from the same
blocks — ``("text", str)``, ``("table", headers, rows)``, ``("images", [(alt, file name)])`` —
so they read alike and a cell means the same in both formats. matplotlib is imported only
when a chart is drawn (the services that draw depend on it; afina.core does not).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

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
