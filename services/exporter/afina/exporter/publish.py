"""After registration: the model leaves afina the way users run models — Ollama, the Hugging Face Hub.

Each publication is tried once per export, recorded on the model's row (``OllamaRegistration``,
``HubPublication``) and reported as an event. A publication that fails (Ollama down, a read-only Hub
token) leaves the model ``succeeded`` and usable in afina with the reason visible; a re-export
(``POST /v1/models/{model}/exports``) retries it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from pydantic import SecretStr

from afina.core.artifacts import (
    ADAPTER_MARKER,
    AdapterManifest,
    ExportManifest,
    HubPublication,
    ManifestInvalid,
    OllamaRegistration,
)
from afina.core.artifacts.evaluation import QualityGate
from afina.core.artifacts.fidelity import ExportVerification, FidelityReport
from afina.core.catalog import BaseModelSpec
from afina.core.db.models import Model
from afina.core.queue.jobs import JobContext
from afina.core.training.lifecycle import job_base_model
from afina.exporter.register import record_publication
from afina.exporter.target import ExportTarget

DEFAULT_HUB_TOKEN_ENV = "HF_TOKEN"


def publish_model(context: JobContext, target: ExportTarget, *, only_missing: bool = False) -> None:
    """Publish where the export options (and the operator's settings) say; ``only_missing`` skips what an
    earlier attempt of this stage already published (a stage that died after registering)."""
    runtime = context.runtime
    settings = runtime.settings
    wants_ollama = target.options.wants_ollama(configured=bool(settings.ollama_url))
    if not wants_ollama and target.options.hub is None:
        return
    with runtime.db.session() as session:
        model = session.get(Model, target.model_name)
        done_ollama = bool(model and (model.ollama or {}).get("status") == "registered")
        done_hub = bool(model and (model.hub or {}).get("status") == "registered")
        gate = QualityGate.model_validate(model.quality_gate) if model is not None and model.quality_gate else None
    if gate is not None and gate.blocks_serving:
        reason = f"blocked by the quality gate: {'; '.join(gate.failures())}"
        context.event(f"Not publishing {target.model_name}: it is {reason}", level="warn")
        now = int(time.time())
        record_publication(context, target.model_name,
                           ollama=OllamaRegistration(name=target.model_name, status="failed", variant=None,
                                                     updated_at=now, error=reason) if wants_ollama else None,
                           hub=HubPublication(repo=target.options.hub.repo, status="failed",
                                              private=target.options.hub.private, updated_at=now, error=reason)
                           if target.options.hub is not None else None)
        return
    manifest = target.existing_manifest(runtime)
    if manifest is None:
        return
    spec = job_base_model(target.source, store=runtime.store, allowed_model_dirs=settings.allowed_model_dirs)
    work_dir = settings.resolved_work_dir / context.job_id / "publish"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        if wants_ollama and not (only_missing and done_ollama):
            registration = _to_ollama(context, target, manifest, spec, work_dir)
            record_publication(context, target.model_name, ollama=registration)
        if target.options.hub is not None and not (only_missing and done_hub):
            publication = _to_hub(context, target, manifest, spec, work_dir)
            record_publication(context, target.model_name, hub=publication)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _fetch(context: JobContext, key: str, path: Path) -> Path:
    if not path.exists():
        context.runtime.store.download_file(key, path)
    return path


def _to_ollama(context: JobContext, target: ExportTarget, manifest: ExportManifest, spec: BaseModelSpec,
               work_dir: Path) -> OllamaRegistration:
    from afina.exporter.ollama import ollama_model_name, register_model_in_ollama

    settings = context.runtime.settings
    chosen = target.options.ollama if not isinstance(target.options.ollama, bool) else None
    try:
        name = ollama_model_name(settings.ollama_prefix_for(target.tenant_id), chosen.name if chosen else None,
                                 target.source.suffix, target.source_job_id)
    except ValueError as exc:
        return OllamaRegistration(name=chosen.name if chosen and chosen.name else target.model_name, status="failed",
                                  variant=manifest.serve, updated_at=int(time.time()), error=str(exc))
    if not settings.ollama_url:
        return OllamaRegistration(name=name, status="failed", variant=manifest.serve, updated_at=int(time.time()),
                                  error="no Ollama is configured (AFINA_OLLAMA_URL)")
    served = manifest.gguf[manifest.serve]
    gguf = _fetch(context, served.key, work_dir / served.key.rsplit("/", 1)[-1])
    context.event(f"Registering {target.model_name} in Ollama as {name} ({manifest.serve.upper()})")
    registration = register_model_in_ollama(url=settings.ollama_url, name=name, gguf_path=gguf, family=spec.family,
                                            system=None, num_ctx=min(spec.context_length, settings.inference_n_ctx),
                                            timeout_s=settings.ollama_timeout_s, variant=manifest.serve,
                                            gguf_sha256=served.sha256)
    if registration.status == "registered":
        context.event(f"Registered in Ollama as {name}; it answered a test chat")
    else:
        context.event(f"Ollama registration of {name} failed: {registration.error}; the model is usable in afina, "
                      f"and POST /v1/models/{target.model_name}/exports retries it", level="warn")
    return registration


def _to_hub(context: JobContext, target: ExportTarget, manifest: ExportManifest, spec: BaseModelSpec,
            work_dir: Path) -> HubPublication:
    from afina.exporter.hub import publish_to_hub
    from afina.exporter.model_card import render_model_card

    settings = context.runtime.settings
    hub = target.options.hub
    assert hub is not None
    env_name = hub.token_env or DEFAULT_HUB_TOKEN_ENV
    if env_name not in settings.hub_token_envs_for(target.tenant_id):  # the worker checks again
        return HubPublication(repo=hub.repo, status="failed", private=hub.private, updated_at=int(time.time()),
                              error=f"token_env {env_name!r} is not one this tenant may use")
    token = os.environ.get(env_name)
    files: list[tuple[str, Path]] = []
    gguf_files: dict[str, str] = {}
    for variant in hub.variants or [manifest.serve]:
        entry = manifest.gguf.get(variant)
        if entry is None:
            return HubPublication(repo=hub.repo, status="failed", private=hub.private, updated_at=int(time.time()),
                                  error=f"variant {variant!r} was not exported (made: {sorted(manifest.gguf)})")
        name = entry.key.rsplit("/", 1)[-1]
        gguf_files[variant] = name
        files.append((name, _fetch(context, entry.key, work_dir / name)))
    modelfile = _fetch(context, manifest.modelfile.key, work_dir / "Modelfile")
    files.append(("Modelfile", modelfile))
    adapter = AdapterManifest.read(context.runtime.store, f"{target.adapter}/{ADAPTER_MARKER}")
    if hub.include_adapter and adapter is not None:
        prefix = target.adapter + "/"
        for entry in adapter.files:
            relative = entry.key[len(prefix):]
            files.append((f"adapter/{relative}", _fetch(context, entry.key, work_dir / "adapter" / relative)))
    fidelity = _fidelity(context, manifest)
    with context.runtime.db.session() as session:
        row = session.get(Model, target.model_name)
        gate = QualityGate.model_validate(row.quality_gate) if row is not None and row.quality_gate else None

    def card(repo_id: str) -> str:
        return render_model_card(repo_id=repo_id, base=spec, adapter=adapter, gguf_files=gguf_files,
                                 served_variant=manifest.serve,
                                 adapter_dir="adapter" if hub.include_adapter and adapter is not None else None,
                                 modelfile=modelfile.read_text(), hyperparameters=target.source.training_config,
                                 fidelity=fidelity, model_name=target.model_name, quality_gate=gate)

    context.event(f"Publishing {target.model_name} to the Hugging Face Hub ({hub.repo}, "
                  f"{'private' if hub.private else 'public'})")
    publication = publish_to_hub(endpoint=settings.hub_endpoint, token=SecretStr(token) if token else None,
                                 target=hub, files=files, model_card=card,
                                 commit_message=f"afina: {target.model_name}",
                                 progress=lambda line: context.event(f"Hub: {line}"))
    if publication.status == "registered":
        context.event(f"Published to the Hub: {publication.url}")
    else:
        context.event(f"Hub publishing failed: {publication.error}", level="warn")
    return publication


def _fidelity(context: JobContext, manifest: ExportManifest) -> FidelityReport | None:
    """The fidelity gate's report of the export, for the model card; None when the gate was skipped (no held-out
    prompt) or ``verification.json`` cannot be trusted (said in an event: the card is written without figures
    rather than not at all)."""
    try:
        return ExportVerification.of_entry(context.runtime.store, manifest.verification).fidelity
    except ManifestInvalid as exc:
        context.event(f"The model card has no fidelity figures: {exc.message}", level="warn")
        return None
