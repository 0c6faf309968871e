"""A job's report as PDF (``report/report.pdf``), rendered from its final HTML page and nothing else.

Every stage that rewrites ``report.html`` (the trainer writes it, the exporter and the evaluator splice their
sections in) renders the PDF again from the page it just wrote, so the PDF always says what the page says,
charts included (the page embeds them as data-URI PNGs). fpdf2 (pure Python) draws it with ``write_html``:
headings, paragraphs, tables, images. The text is set in DejaVu Sans, the TTF that ships inside matplotlib
(every service that writes a report depends on it), so Portuguese and most Latin, Greek and Cyrillic text
renders; without matplotlib a system DejaVu is used, else the PDF core font Helvetica with each character it
cannot show replaced. fpdf2 is imported only when a PDF is rendered: afina.core does not depend on it.

A report page is only ever read, never trusted: a character no font has is dropped, a control character or a
lone surrogate is replaced, an image that does not decode is left out, and a page ``write_html`` cannot lay
out is rendered again as plain text with its charts. ``report_pdf`` never raises: a PDF that cannot be made at
all is logged and left out, and the stage that asked goes on.
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import logging
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from afina.core.logging import log_event

log = logging.getLogger("afina.report_pdf")

REPORT_PDF = "report.pdf"
FONT_FAMILY = "DejaVu"
MONO_FAMILY = "DejaVuMono"
# style -> file name, in matplotlib's mpl-data/fonts/ttf and Debian's fonts-dejavu-core alike
FONT_FILES = {"": "DejaVuSans.ttf", "B": "DejaVuSans-Bold.ttf", "I": "DejaVuSans-Oblique.ttf",
              "BI": "DejaVuSans-BoldOblique.ttf"}
MONO_FILE = "DejaVuSansMono.ttf"
SYSTEM_FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"),)
BODY_PT = 8.5
MAX_IMAGE_HEIGHT_SHARE = 0.6  # of the page's printable height: a chart never takes a page of its own

_BODY = re.compile(r"<body[^>]*>(.*)</body>", re.S | re.I)
_TITLE = re.compile(r"<title>(.*?)</title>", re.S | re.I)
_IMG = re.compile(r'<img\b([^>]*?)\bsrc="(data:image/[^"]*)"([^>]*)>', re.I)
_ALT = re.compile(r'\balt="([^"]*)"', re.I)
_UNSAFE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
# what the core font cannot show, spelled with what it can
_CORE_FONT_SPELLINGS = {"≥": ">=", "≤": "<=", "→": "->", "←": "<-", "…": "...", "‘": "'", "’": "'", "“": '"',
                        "”": '"', "–": "-", "—": "-", "−": "-", "•": "*"}


def report_pdf(page: str) -> bytes | None:
    """The HTML report ``page`` as PDF bytes; None (logged) when no PDF could be made of it."""
    try:
        return render_pdf(page)
    except Exception as error:  # noqa: BLE001 - the PDF is a copy of the page: never fail the stage for it
        log_event(log, "report_pdf.layout_failed", logging.WARNING, error=f"{type(error).__name__}: {error}")
    try:
        return render_pdf(page, plain=True)
    except Exception as error:  # noqa: BLE001
        log_event(log, "report_pdf.failed", logging.ERROR, error=f"{type(error).__name__}: {error}")
        return None


def render_pdf(page: str, *, plain: bool = False) -> bytes:
    """The page as PDF through ``write_html`` (``plain``: its text line by line and its charts, for a page whose
    layout fpdf2 cannot make); raises what fpdf2 raises."""
    from fpdf import FPDF

    page = _UNSAFE.sub("\ufffd", page)
    pdf = FPDF(format="A4", unit="mm")
    pdf.set_auto_page_break(True, margin=15)
    unicode = _add_fonts(pdf)
    family = FONT_FAMILY if unicode else "helvetica"
    title = _TITLE.search(page)
    if title:
        pdf.set_title(_text(html.unescape(title.group(1)).strip(), unicode))
    pdf.set_creator("afina")
    pdf.set_font(family, size=BODY_PT)
    pdf.add_page()
    match = _BODY.search(page)
    body = match.group(1) if match else page
    if not unicode:
        body = _text(body, unicode)
    if plain:
        _write_plain(pdf, body, unicode)
    else:
        pdf.write_html(_fit_images(body, pdf), font_family=family, tag_styles=_tag_styles(unicode),
                       table_line_separators=True)
    return bytes(pdf.output())


def _add_fonts(pdf: Any) -> bool:
    """Register DejaVu Sans (regular, bold, oblique, bold oblique, mono) from the first folder that has them all;
    False when none does (the core fonts then)."""
    for folder in _font_dirs():
        if all((folder / name).is_file() for name in (*FONT_FILES.values(), MONO_FILE)):
            for style, name in FONT_FILES.items():
                pdf.add_font(FONT_FAMILY, style, str(folder / name))
            pdf.add_font(MONO_FAMILY, "", str(folder / MONO_FILE))
            return True
    log_event(log, "report_pdf.no_unicode_font", logging.WARNING, looked_in=[str(d) for d in _font_dirs()])
    return False


def _font_dirs() -> list[Path]:
    dirs = []
    try:
        import matplotlib

        dirs.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
    except ImportError:
        pass
    return [*dirs, *SYSTEM_FONT_DIRS]


def _tag_styles(unicode: bool) -> dict[str, Any]:
    from fpdf import FontFace, TextStyle

    ink = "#222222"
    return {"h1": TextStyle(font_size_pt=16, color=ink, t_margin=2, b_margin=3),
            "h2": TextStyle(font_size_pt=12.5, font_style="B", color=ink, t_margin=5, b_margin=2),
            "h3": TextStyle(font_size_pt=11, font_style="B", color=ink, t_margin=4, b_margin=2),
            "code": FontFace(family=MONO_FAMILY if unicode else "courier")}


def _text(text: str, unicode: bool) -> str:
    """``text`` as the chosen font can show it: as is for DejaVu; in Latin-1 for the core font."""
    if unicode:
        return text
    for char, spelling in _CORE_FONT_SPELLINGS.items():
        text = text.replace(char, spelling)
    return text.encode("latin-1", "replace").decode("latin-1")


def _png_size(data_uri: str) -> tuple[bytes, int, int] | None:
    """The image's bytes and pixel size; None for one that does not decode."""
    from PIL import Image

    try:
        raw = base64.b64decode(data_uri.split(",", 1)[1], validate=False)
        with Image.open(io.BytesIO(raw)) as picture:
            picture.load()
            width, height = picture.size
    except (IndexError, ValueError, binascii.Error, OSError, Image.DecompressionBombError):
        return None
    return (raw, width, height) if width > 0 and height > 0 else None


def _image_box(pdf: Any, width_px: int, height_px: int) -> tuple[float, float]:
    """The image's size on the page in mm: the printable width, or less for a tall one."""
    width = pdf.epw
    height = width * height_px / width_px
    limit = (pdf.h - pdf.t_margin - pdf.b_margin) * MAX_IMAGE_HEIGHT_SHARE
    if height > limit:
        width, height = width * limit / height, limit
    return width, height


def _fit_images(body: str, pdf: Any) -> str:
    """Each embedded image sized to the page (``write_html`` reads width and height in points); one that does
    not decode becomes its alt text."""
    def fitted(match: re.Match[str]) -> str:
        before, uri, after = match.groups()
        decoded = _png_size(html.unescape(uri))
        if decoded is None:
            alt = _ALT.search(before + after)
            return f"<p>[{alt.group(1) if alt else 'image'}: not shown]</p>"
        width, height = _image_box(pdf, decoded[1], decoded[2])
        return f'<img src="{uri}" width="{width * pdf.k:.2f}" height="{height * pdf.k:.2f}">'

    return _IMG.sub(fitted, body)


class _PlainText(HTMLParser):
    """A page's text, one paragraph per block element, and its images in place (the fallback layout)."""

    BLOCKS = {"p", "h1", "h2", "h3", "h4", "tr", "figcaption", "li", "div", "table", "br"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[tuple[str, str]] = [("text", "")]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.BLOCKS:
            self.parts.append(("text", ""))
        if tag == "img":
            self.parts += [("image", dict(attrs).get("src") or ""), ("text", "")]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._add(" | ")
        elif tag in self.BLOCKS:
            self.parts.append(("text", ""))

    def handle_data(self, data: str) -> None:
        self._add(data)

    def _add(self, text: str) -> None:
        kind, held = self.parts[-1]
        self.parts[-1] = ("text", held + text) if kind == "text" else self.parts[-1]


def _write_plain(pdf: Any, body: str, unicode: bool) -> None:
    parser = _PlainText()
    parser.feed(body)
    parser.close()
    for kind, value in parser.parts:
        if kind == "image":
            decoded = _png_size(value)
            if decoded is not None:
                width, height = _image_box(pdf, decoded[1], decoded[2])
                pdf.image(io.BytesIO(decoded[0]), w=width, h=height)
            continue
        line = " ".join(value.split()).strip(" |")
        if line:
            pdf.multi_cell(0, BODY_PT * 0.5, _text(line, unicode), new_x="LMARGIN", new_y="NEXT",
                           wrapmode="CHAR")
