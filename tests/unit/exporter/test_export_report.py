"""The export's section of the job's report: the fidelity figures of every variant (size, sha256, agreement with f16
and of f16 with the merged model, perplexity against f16, the limits, the verdict), spliced into the trainer's pages
once and replaced by a re-export, next to the evaluation's section; ``verification.json`` read through its model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from afina.core.artifacts import ExportManifest, FileEntry, ManifestInvalid
from afina.core.artifacts.fidelity import (
    ExportVerification,
    FidelityReport,
    FidelityTolerances,
    PromptMismatch,
    ReferenceFigures,
    VariantFidelity,
)
from afina.core.store.local import LocalStore
from afina.exporter.report import export_report_files

TENANT, JOB = "acme", "ftjob-report0001"
MODELS = f"models/{TENANT}/{JOB}"
REPORT = f"jobs/{TENANT}/{JOB}/report"
TOLERANCES = FidelityTolerances(tokens=32, min_agreement=0.95, min_variant_agreement=0.0, max_perplexity_ratio=1.5,
                                near_tie_margin=0.05, min_disagreements=2)


def variant(name: str, compared_with: str, agreement: float, with_reference: float, perplexity: float,
            ratio: float, mismatches: list[PromptMismatch] | None = None, near_ties: int = 0) -> VariantFidelity:
    return VariantFidelity(variant=name, file=f"model-{name}.gguf", compared_with=compared_with,  # type: ignore[arg-type]
                           prompts_compared=4, agreement=agreement, near_ties=near_ties, mismatches=mismatches or [],
                           agreement_with_reference=with_reference, tokenization_matches=4,
                           tokenization_mismatches=[], perplexity=perplexity, perplexity_ratio=ratio, seconds=1.0,
                           problems=[])


def fidelity() -> FidelityReport:
    tie = PromptMismatch(prompt=2, position=7, expected=11, actual=12, expected_margin=0.01, near_tie=True)
    q4_off = PromptMismatch(prompt=1, position=3, expected=5, actual=6, expected_margin=2.0)
    return FidelityReport(
        passed=True, tolerances=TOLERANCES, prompts=4, truncated_prompts=0, texts=3, perplexity_tokens=412,
        reference=ReferenceFigures(dtype="float32", perplexity=6.123456, seconds=2.0),
        variants={"f16": variant("f16", "reference", 0.75, 0.75, 6.1239, 1.0, [tie], near_ties=1),
                  "q4_k_m": variant("q4_k_m", "f16", 0.75, 0.5, 6.6, 1.0777, [q4_off])},
        failures=[], warnings=[])


def exported(store: LocalStore, report: FidelityReport | None) -> ExportManifest:
    """What the exporter commits: GGUFs, Modelfile, verification.json, the manifest."""
    def put(name: str, data: bytes) -> FileEntry:
        return FileEntry.of(store.put_bytes(f"{MODELS}/{name}", data))

    verification = ExportVerification.build(passed=True, family="chatml", checks={}, fidelity=report,
                                            timings={"fidelity": 3.2})
    return ExportManifest.build(
        name=f"ft:smollm2-135m-instruct:{TENANT}:aeon:{JOB}", job_id=JOB, tenant_id=TENANT,
        base_model="smollm2-135m-instruct", family="chatml", serve="q4_k_m", adapter=f"jobs/{TENANT}/{JOB}/adapter",
        gguf={"f16": put("model-f16.gguf", b"f" * 270_000), "q4_k_m": put("model-q4_k_m.gguf", b"q" * 100_500)},
        modelfile=put("Modelfile", b"FROM ./model-q4_k_m.gguf\n"),
        verification=put("verification.json", verification.to_json()), created_at=1)


def trainer_pages(store: LocalStore) -> None:
    store.put_bytes(f"{REPORT}/report.md", b"# Training report\n\n## Results\n\nloss 1.0\n")
    store.put_bytes(f"{REPORT}/report.html", b"<!DOCTYPE html><html><body><h1>Training</h1></body></html>\n")


def test_the_section_shows_every_variants_figures_and_lists_verification_json(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    trainer_pages(store)
    manifest = exported(store, fidelity())
    files = export_report_files(store, manifest, tenant_id=TENANT, job_id=JOB)

    assert [entry.key for entry in files] == [f"{MODELS}/verification.json", f"{REPORT}/report.md",
                                              f"{REPORT}/report.html", f"{REPORT}/report.pdf"]
    assert all(entry.matches(store) for entry in files)  # the sizes and sha256s the result files will carry
    markdown = store.get_bytes(f"{REPORT}/report.md").decode()
    assert markdown.startswith("# Training report") and markdown.count("## Export and fidelity") == 1
    f16_sha, q4_sha = manifest.gguf["f16"].sha256[:12], manifest.gguf["q4_k_m"].sha256[:12]
    # f16 against the merged model (3 of 4 exact, one near tie); q4_k_m against f16, and against the merged model
    assert (f"| f16 | model-f16.gguf | 0.3 MB | {f16_sha} | – | 75% (3/4) | 1 | 6.1239 | 1.0000× | agreement ≥ 95% "
            "| pass |") in markdown
    assert (f"| q4_k_m | model-q4_k_m.gguf | 0.1 MB | {q4_sha} | 75% (3/4) | 50% | 0 | 6.6 | 1.0777× | agreement ≥ "
            "0%, perplexity ≤ 1.5× | pass |") in markdown
    assert "Served variant: `q4_k_m`" in markdown and "`verification.json`" in markdown
    assert "Fidelity on 4 held-out prompt(s), first 32 greedy tokens each" in markdown
    assert "run in float32); the merged model's perplexity 6.12346 on 3 validation text(s) (412 tokens)" in markdown
    assert "within 0.05 (the other side taking the runner-up) still agrees" in markdown
    assert "fails only from 2 disagreeing prompt(s)" in markdown and "Fidelity gate: passed." in markdown
    html_page = store.get_bytes(f"{REPORT}/report.html").decode()
    assert html_page.count("<h2>Export and fidelity</h2>") == 1 and html_page.rstrip().endswith("</body></html>")
    assert f"<td>{q4_sha}</td>" in html_page and "<code>verification.json</code>" in html_page
    # report.pdf rendered from the spliced page: the trainer's heading and the export's section, its cells
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(store.get_bytes(f"{REPORT}/report.pdf")))
    text = "\n".join(page.extract_text() for page in reader.pages)
    for expected in ("Training", "Export and fidelity", "Fidelity gate: passed."):
        assert expected in text, expected
    assert q4_sha in "".join(text.split())  # a cell of the 11-column table, wrapped in its narrow column
    (tmp_path / "report.pdf").write_bytes(store.get_bytes(f"{REPORT}/report.pdf"))  # for a person to look at


def test_a_re_export_replaces_the_section_and_keeps_the_evaluation(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    trainer_pages(store)
    export_report_files(store, exported(store, fidelity()), tenant_id=TENANT, job_id=JOB)
    page = store.get_bytes(f"{REPORT}/report.md").decode()
    evaluation = ("<!-- afina:evaluation:start -->\n## Evaluation\n\nQuality gate: passed.\n"
                  "<!-- afina:evaluation:end -->\n")
    store.put_bytes(f"{REPORT}/report.md", (page + "\n" + evaluation).encode())

    export_report_files(store, exported(store, None), tenant_id=TENANT, job_id=JOB)  # again, no held-out set now
    page = store.get_bytes(f"{REPORT}/report.md").decode()
    assert page.count("## Export and fidelity") == 1 and page.count("## Evaluation") == 1
    assert page.index("## Export and fidelity") < page.index("## Evaluation")
    assert "Fidelity gate: skipped — the job has no held-out conversation" in page
    assert "6.1239" not in page  # the earlier figures are gone


def test_without_report_pages_only_verification_json_is_published(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    files = export_report_files(store, exported(store, fidelity()), tenant_id=TENANT, job_id=JOB)
    assert [entry.key for entry in files] == [f"{MODELS}/verification.json"]
    assert not store.exists(f"{REPORT}/report.md")


def test_verification_json_is_read_through_its_model_and_checked(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    manifest = exported(store, fidelity())
    read = ExportVerification.of_entry(store, manifest.verification)
    assert read.fidelity == fidelity() and read.timings == {"fidelity": 3.2}
    # a verification.json written before the file had a version or min_disagreements reads as the rule then was
    old = b'{"passed": true, "checks": {}, "fidelity": null, "timings": {}}'
    assert ExportVerification.parse(old, "old").fidelity is None
    assert FidelityTolerances(tokens=32, min_agreement=0.95, min_variant_agreement=0.0,
                              max_perplexity_ratio=1.5).min_disagreements == 1
    store.put_bytes(manifest.verification.key, b'{"passed": false}')  # changed after the export listed it
    with pytest.raises(ManifestInvalid, match="changed after the export listed it"):
        ExportVerification.of_entry(store, manifest.verification)


def test_a_failed_gate_puts_its_figures_in_the_report_without_a_manifest(tmp_path: Path) -> None:
    """A failed gate registers nothing, so no manifest lists the GGUFs: the stage passes the files it made."""
    from afina.exporter.report import report_files, section_blocks

    store = LocalStore(tmp_path / "store")
    trainer_pages(store)
    broke = "the f16 GGUF gives the trained model's first 32 greedy tokens on 3/4 held-out prompts (agreement 0.75)"
    figures = fidelity().variants["f16"].model_copy(update={"problems": [broke]})
    report = fidelity().model_copy(update={"passed": False, "failures": [broke],
                                           "variants": {**fidelity().variants, "f16": figures},
                                           "warnings": ["llama.cpp tokenizes 1/4 rendered prompts differently"]})
    failed = ExportVerification.build(passed=False, fidelity=report)
    verification = FileEntry.of(failed.write(store, f"{MODELS}/verification.json"))
    gguf = {"f16": FileEntry(key=f"{MODELS}/model-f16.gguf", bytes=270_000, sha256="ab" * 32)}
    files = report_files(store, section_blocks(gguf, failed, serve="f16"), verification, tenant_id=TENANT,
                         job_id=JOB)
    assert [entry.key for entry in files] == [verification.key, f"{REPORT}/report.md", f"{REPORT}/report.html",
                                              f"{REPORT}/report.pdf"]
    page = store.get_bytes(f"{REPORT}/report.md").decode()
    assert f"Fidelity gate: FAILED: {broke}." in page
    assert "| f16 | model-f16.gguf | 0.3 MB | abababababab | – | 75% (3/4) |" in page and page.count("| FAIL |") == 1
    assert "Note: llama.cpp tokenizes 1/4 rendered prompts differently." in page
