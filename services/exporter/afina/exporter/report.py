"""The export's section of the job's report: every GGUF variant with its size, sha256 and fidelity figures.

The trainer writes the job's report pages (``report/report.md`` and ``report.html``); the exporter splices an
"Export and fidelity" section into them through ``afina.core.reports``, as the evaluator adds its own, so a
re-export replaces the section in place (and ``report.pdf`` is rendered again from the new HTML page). The
figures come from the export's ``verification.json`` (read through ``ExportVerification``, checked against the
manifest's sha256) and are shown as measured; the file itself is published with the job's result files for
the per-prompt details.
"""

from __future__ import annotations

from afina.core.artifacts import ExportManifest, FileEntry
from afina.core.artifacts.fidelity import ExportVerification, FidelityReport, VariantFidelity
from afina.core.datasets.layout import job_prefix
from afina.core.reports import Block, html_section, markdown_section, splice_report_pages
from afina.core.store import ArtifactStore

SECTION = "export"
HEADING = "Export and fidelity"
SHA256_SHOWN = 12  # hex digits of each file's sha256 in the table (the full one is in the manifest)


def export_report_files(store: ArtifactStore, manifest: ExportManifest, *, tenant_id: str,
                        job_id: str) -> list[FileEntry]:
    """Splice the export section into the job's report pages (those the trainer wrote) and return what becomes
    the job's result files: ``verification.json``, each page rewritten and ``report.pdf``."""
    verification = ExportVerification.of_entry(store, manifest.verification)
    blocks = section_blocks(manifest.gguf, verification, serve=manifest.serve, lora_gguf=manifest.lora_gguf)
    return report_files(store, blocks, manifest.verification, tenant_id=tenant_id, job_id=job_id)


def report_files(store: ArtifactStore, blocks: list[Block], verification: FileEntry, *, tenant_id: str,
                 job_id: str) -> list[FileEntry]:
    """The section (``blocks``) spliced into the job's report pages; ``verification``, the pages rewritten and
    the ``report.pdf`` rendered from the new HTML page.

    Also what a failed gate leaves: its figures are what the user needs then (the pipeline passes the
    GGUFs it made, which no manifest lists)."""
    sections = {True: html_section(SECTION, HEADING, blocks, {}), False: markdown_section(SECTION, HEADING, blocks)}
    pages = splice_report_pages(store, f"{job_prefix(tenant_id, job_id)}/report", sections, name=SECTION)
    return [verification, *pages.values()]


def section_blocks(gguf: dict[str, FileEntry], verification: ExportVerification, *, serve: str,
                   lora_gguf: FileEntry | None = None) -> list[Block]:
    """The section as blocks: what was exported and served, a row per file, the limits and the verdict."""
    fidelity = verification.fidelity
    blocks: list[Block] = [("text", f"Served variant: `{serve}`; {len(gguf)} GGUF file(s), "
                                    "every one checked (stock template, EOS, prompt tokens, a greedy answer). "
                                    "Per-prompt figures: `verification.json`.")]
    if fidelity is None:
        blocks.append(("text", "Fidelity gate: skipped — the job has no held-out conversation (no test or "
                               "validation split) to compare the GGUFs with the trained model on."))
    else:
        blocks.append(("text", _measured(fidelity)))
    rows = [[variant, entry.key.rsplit("/", 1)[-1], _size(entry.bytes), entry.sha256[:SHA256_SHOWN],
             *_variant_cells(fidelity, variant)] for variant, entry in gguf.items()]
    if lora_gguf is not None:
        entry = lora_gguf
        rows.append(["LoRA adapter", entry.key.rsplit("/", 1)[-1], _size(entry.bytes), entry.sha256[:SHA256_SHOWN],
                     *["–"] * 7])
    blocks.append(("table", ["variant", "file", "size", "sha256", "token agreement with f16",
                             "token agreement with the merged model", "near ties", "perplexity", "perplexity vs f16",
                             "limits", "result"], rows))
    if fidelity is not None:
        limits = fidelity.tolerances
        blocks.append(("text", f"Limits: the f16 GGUF gives the merged model's first {limits.tokens} greedy tokens on "
                               f"at least {_share(limits.min_agreement)} of the prompts; each quantized variant "
                               f"gives f16's on at least {_share(limits.min_variant_agreement)}, with a perplexity "
                               f"at most {limits.max_perplexity_ratio:g}× f16's. A prompt whose tokens first differ "
                               f"where the compared-with side's top two logits were within "
                               f"{limits.near_tie_margin:g} (the other side taking the runner-up) still agrees, and "
                               f"an agreement limit fails only from {limits.min_disagreements} disagreeing "
                               "prompt(s)."))
        verdict = "passed" if fidelity.passed else "FAILED: " + "; ".join(fidelity.failures)
        blocks.append(("text", f"Fidelity gate: {verdict}."))
        blocks += [("text", f"Note: {warning}.") for warning in fidelity.warnings]
    return blocks


def _measured(fidelity: FidelityReport) -> str:
    reference = fidelity.reference
    perplexity = (f"; the merged model's perplexity {_figure(reference.perplexity)} on {fidelity.texts} validation "
                  f"text(s) ({fidelity.perplexity_tokens} tokens)" if reference.perplexity is not None else "")
    truncated = f" ({fidelity.truncated_prompts} cut to their last tokens)" if fidelity.truncated_prompts else ""
    return (f"Fidelity on {fidelity.prompts} held-out prompt(s){truncated}, first {fidelity.tolerances.tokens} greedy "
            f"tokens each: the f16 GGUF against the merged model (the trained weights, run in "
            f"{reference.dtype}){perplexity}; each quantized variant against the f16 GGUF.")


def _variant_cells(fidelity: FidelityReport | None, variant: str) -> list[str]:
    figures: VariantFidelity | None = fidelity.variants.get(variant) if fidelity is not None else None
    if fidelity is None or figures is None:
        return ["–"] * 7
    limits = fidelity.tolerances
    is_base = figures.compared_with == "reference"
    # the agreement the limit reads is against compared_with: the merged model for f16, f16 for the others
    measured = f"{_share(figures.agreement)} ({_agreeing(figures)}/{figures.prompts_compared})"
    with_f16 = "–" if is_base else measured
    with_reference = measured if is_base else _share(figures.agreement_with_reference)
    if is_base:
        limit = f"agreement ≥ {_share(limits.min_agreement)}"
    else:
        limit = f"agreement ≥ {_share(limits.min_variant_agreement)}, perplexity ≤ {limits.max_perplexity_ratio:g}×"
    return [with_f16, with_reference, str(figures.near_ties), _figure(figures.perplexity),
            "–" if figures.perplexity_ratio is None else f"{figures.perplexity_ratio:.4f}×", limit,
            "pass" if figures.passed else "FAIL"]


def _agreeing(figures: VariantFidelity) -> int:
    return figures.prompts_compared - len(figures.mismatches)


def _share(value: float) -> str:
    return f"{value:.2%}".replace(".00%", "%")


def _figure(value: float | None) -> str:
    return "–" if value is None else format(value, ".6g")


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"
