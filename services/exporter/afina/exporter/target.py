"""What an export stage works on: a fine-tuning job's own model, or a registered model exported again.

A fine-tuning job exports the adapter it trained; a re-export job (``kind="export"``, created by
``POST /v1/models/{model}/exports``) works on the model of its source job — same adapter, same store
prefix, same registry row — with the options it was created with.
"""

from __future__ import annotations

from dataclasses import dataclass

from afina.core.artifacts import ExportManifest, ExportOptions, ManifestInvalid
from afina.core.datasets.layout import adapter_prefix, model_prefix
from afina.core.db import repository as repo
from afina.core.db.models import Job
from afina.core.naming import fine_tuned_model_name
from afina.core.runtime import Runtime

EXPORT_KIND = "export"


@dataclass(frozen=True)
class ExportTarget:
    job: Job  # the job this stage runs for
    source: Job  # the job whose adapter and model are exported (the same job unless a re-export)
    model_name: str
    options: ExportOptions

    @property
    def reexport(self) -> bool:
        return self.job.kind == EXPORT_KIND

    @property
    def tenant_id(self) -> str:
        return self.source.tenant_id

    @property
    def source_job_id(self) -> str:
        return self.source.id

    @property
    def prefix(self) -> str:
        return model_prefix(self.tenant_id, self.source.id)

    @property
    def adapter(self) -> str:
        return adapter_prefix(self.tenant_id, self.source.id)

    def existing_manifest(self, runtime: Runtime) -> ExportManifest | None:
        """What an earlier export of this model committed (a re-export adds to it)."""
        try:
            return ExportManifest.read(runtime.store, f"{self.prefix}/manifest.json")
        except ManifestInvalid:
            return None


def export_target(runtime: Runtime, job: Job) -> ExportTarget:
    options = ExportOptions.model_validate(job.export_options or {})
    if job.kind != EXPORT_KIND:
        name = fine_tuned_model_name(job.model, job.tenant_id, job.suffix, job.id)
        return ExportTarget(job=job, source=job, model_name=name, options=options)
    export = (job.method or {}).get(EXPORT_KIND) or {}
    with runtime.db.session() as session:
        source = repo.get_job(session, job.tenant_id, str(export["source_job_id"]))
    return ExportTarget(job=job, source=source, model_name=str(export["model"]), options=options)
