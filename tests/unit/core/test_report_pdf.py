"""``report.pdf``, rendered from the job's HTML report page: a valid PDF whose text has the page's headings, table
cells and Portuguese accents, whose images are the page's charts, rendered again when a later stage splices its
section in; odd text and broken images never stop it, and a PDF that cannot be made is left out."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader

from afina.core import report_pdf as report_pdf_module
from afina.core.report_pdf import REPORT_PDF, render_pdf, report_pdf
from afina.core.reports import html_blocks, html_section, markdown_section, splice_report_pages
from afina.core.store.local import LocalStore

PREFIX = "jobs/acme/ftjob-pdf0001/report"


def chart(colour: str, size: tuple[int, int] = (660, 330)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def trainer_page(*, extra: str = "") -> str:
    """A page shaped as the trainer writes it: styles in the head, tables, an embedded chart."""
    images = {"chart_loss.png": chart("#1f77b4")}
    body = [
        "<h1>Training report — ftjob-pdf0001</h1>", "<h2>Summary</h2>",
        *html_blocks([("table", ("run", ""), [("base model", "`smollm2-135m-instruct`"),
                                              ("avaliação", "não há validação — ação concluída")])], images),
        "<h2>Charts</h2>", *html_blocks([("images", [("Loss", "chart_loss.png")])], images), extra]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Training report</title>'
            "<style>body{font-family:sans-serif}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def pdf_text(pdf: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)


def pdf_images(pdf: bytes) -> list[Any]:
    return [image.image for page in PdfReader(io.BytesIO(pdf)).pages for image in page.images]


def test_the_pdf_has_the_pages_headings_cells_accents_and_charts(tmp_path: Path) -> None:
    pdf = report_pdf(trainer_page())
    assert pdf is not None and pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    text = pdf_text(pdf)
    for expected in ("Training report — ftjob-pdf0001", "Summary", "Charts", "smollm2-135m-instruct",
                     "avaliação", "não há validação — ação concluída"):
        assert expected in text, expected
    assert "font-family" not in text  # the head's styles are not text of the report
    images = pdf_images(pdf)
    assert len(images) == 1 and images[0].size == (660, 330)
    assert images[0].convert("RGB").getpixel((10, 10)) == (0x1F, 0x77, 0xB4)  # the chart itself, not a blank
    assert PdfReader(io.BytesIO(pdf)).metadata.title == "Training report"
    (tmp_path / REPORT_PDF).write_bytes(pdf)  # for a person to open while debugging


def test_a_tall_chart_is_scaled_to_fit_one_page() -> None:
    images = {"tall.png": chart("#2ca02c", (300, 3000))}
    page = "<html><body><h1>Tall</h1>" + "".join(html_blocks([("images", [("Tall", "tall.png")])], images))
    pdf = render_pdf(page + "</body></html>")
    reader = PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) == 1 and len(reader.pages[0].images) == 1


def test_splicing_a_later_section_renders_the_pdf_again(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes(f"{PREFIX}/report.md", b"# Training report\n")
    store.put_bytes(f"{PREFIX}/report.html", trainer_page().encode())
    store.put_bytes(f"{PREFIX}/{REPORT_PDF}", report_pdf(trainer_page()) or b"")
    before = store.get_bytes(f"{PREFIX}/{REPORT_PDF}")
    assert "Avaliação" not in pdf_text(before) and len(pdf_images(before)) == 1

    blocks = [("text", "Avaliação no conjunto de teste: `positivo` e `negativo`."),
              ("table", ["modelo", "macro F1"], [["ajustado", "0.9615"]]),
              ("images", [("Métricas por modelo", "metrics_overview.png")])]
    sections = {True: html_section("evaluation", "Avaliação", blocks, {"metrics_overview.png": chart("#d62728")}),
                False: markdown_section("evaluation", "Avaliação", blocks)}
    written = splice_report_pages(store, PREFIX, sections, name="evaluation")

    assert list(written) == ["report.md", "report.html", REPORT_PDF]
    assert all(entry.matches(store) for entry in written.values())  # what the result files will carry
    after = store.get_bytes(f"{PREFIX}/{REPORT_PDF}")
    text = pdf_text(after)
    for expected in ("Training report — ftjob-pdf0001", "Avaliação", "Avaliação no conjunto de teste",
                     "0.9615", "Métricas por modelo"):
        assert expected in text, expected
    assert len(pdf_images(after)) == 2  # the trainer's chart and the evaluation's

    # the stage runs again: its section is replaced in the page, so in the PDF too
    blocks[1] = ("table", ["modelo", "macro F1"], [["ajustado", "0.8123"]])
    sections[True] = html_section("evaluation", "Avaliação", blocks, {"metrics_overview.png": chart("#d62728")})
    splice_report_pages(store, PREFIX, sections, name="evaluation")
    text = pdf_text(store.get_bytes(f"{PREFIX}/{REPORT_PDF}"))
    assert "0.8123" in text and "0.9615" not in text and text.count("Avaliação no conjunto") == 1


def test_no_pdf_without_an_html_page(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes(f"{PREFIX}/report.md", b"# Training report\n")
    written = splice_report_pages(store, PREFIX, {True: "<h2>x</h2>", False: "## x\n"}, name="export")
    assert list(written) == ["report.md"] and not store.exists(f"{PREFIX}/{REPORT_PDF}")


def test_odd_text_and_a_broken_image_do_not_stop_the_pdf() -> None:
    odd = ("<p>mojibake: aÃ§Ã£o Ã© â€” controls \x00\x07\x1b and a lone surrogate \ud800, CJK 中文, emoji 😀</p>"
           '<figure><img alt="Broken chart" src="data:image/png;base64,bm90IGEgcG5n"></figure>'
           '<figure><img alt="Garbage" src="data:image/png;base64,%%%"></figure>')
    pdf = report_pdf(trainer_page(extra=odd))
    assert pdf is not None
    text = pdf_text(pdf)
    assert "mojibake: aÃ§Ã£o Ã©" in text and "não há validação" in text
    assert "[Broken chart: not shown]" in text and "[Garbage: not shown]" in text
    assert len(pdf_images(pdf)) == 1  # the good chart only


def test_without_a_unicode_font_the_core_font_still_shows_portuguese(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    monkeypatch.setattr(report_pdf_module, "_font_dirs", lambda: [tmp_path / "no-fonts"])
    pdf = report_pdf(trainer_page(extra="<p>limite ≥ 95% — CJK 中文</p>"))
    assert pdf is not None
    text = pdf_text(pdf)
    assert "não há validação - ação concluída" in text and "limite >= 95%" in text and "CJK ??" in text
    assert len(pdf_images(pdf)) == 1


def test_a_page_fpdf2_cannot_lay_out_is_rendered_as_plain_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from fpdf import FPDF

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise ValueError("Not enough horizontal space to render a single character")

    monkeypatch.setattr(FPDF, "write_html", refuse)
    pdf = report_pdf(trainer_page())
    assert pdf is not None
    text = pdf_text(pdf)
    assert "Summary" in text and "avaliação | não há validação — ação concluída" in text
    assert len(pdf_images(pdf)) == 1


def test_a_pdf_that_cannot_be_made_is_left_out_and_the_pages_are_still_written(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> bytes:
        raise RuntimeError("fpdf2 is not installed in this image")

    monkeypatch.setattr(report_pdf_module, "render_pdf", broken)
    assert report_pdf(trainer_page()) is None
    store = LocalStore(tmp_path / "store")
    store.put_bytes(f"{PREFIX}/report.html", trainer_page().encode())
    written = splice_report_pages(store, PREFIX, {True: "<h2>Export</h2>", False: "## Export\n"}, name="export")
    assert list(written) == ["report.html"] and not store.exists(f"{PREFIX}/{REPORT_PDF}")
    assert "<h2>Export</h2>" in store.get_bytes(f"{PREFIX}/report.html").decode()
    assert "report_pdf.failed" in caplog.text and "report.pdf_not_rewritten" in caplog.text
