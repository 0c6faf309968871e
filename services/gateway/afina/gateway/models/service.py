"""Which models a tenant can call: every catalog base model, its own registered fine-tunes, and its routes
(aliases such as ``aeon-custom``, listed as models: apps call them by that name)."""

from __future__ import annotations

from afina.core.artifacts.evaluation import QualityGate
from afina.core.catalog import CATALOG, BaseModelSpec, catalog_model
from afina.core.db import repository as repo
from afina.core.db.models import Model
from afina.core.errors import AfinaError, NotFound
from afina.core.runtime import Runtime
from afina.gateway.models.protocol import ModelExtension, ModelList, ModelObject

BASE_MODEL_OWNER = "afina"


def _base_created(spec: BaseModelSpec) -> int:
    """The weights' file time when they are on this machine (the catalog carries no date)."""
    try:
        return int(spec.gguf_path().stat().st_mtime)
    except (AfinaError, OSError):
        return 0


def base_model_object(spec: BaseModelSpec) -> ModelObject:
    return ModelObject(id=spec.id, created=_base_created(spec), owned_by=BASE_MODEL_OWNER)


def list_models(runtime: Runtime, tenant_id: str) -> ModelList:
    data = [base_model_object(spec) for spec in CATALOG.values()]
    with runtime.db.session() as session:
        data += [ModelObject(id=row.name, created=row.created_at, owned_by=row.tenant_id)
                 for row in repo.list_models(session, tenant_id)]
        data += [ModelObject(id=row.name, created=row.created_at, owned_by=row.tenant_id)
                 for row in repo.list_routes(session, tenant_id)]
    return ModelList(data=data)


def get_model(runtime: Runtime, tenant_id: str, name: str) -> ModelObject:
    spec = catalog_model(name)  # only catalog models are listed and served; paths and URIs are for training
    if spec is not None:
        return base_model_object(spec)
    with runtime.db.session() as session:
        row = repo.get_model(session, tenant_id, name) or repo.get_route(session, tenant_id, name)
    if row is None:
        raise NotFound(f"The model '{name}' does not exist", param="model", code="model_not_found")
    extension = None
    if isinstance(row, Model):
        gate = QualityGate.model_validate(row.quality_gate) if row.quality_gate else None
        extension = ModelExtension(quality_gate=gate, blocked=gate is not None and gate.blocks_serving)
    return ModelObject(id=row.name, created=row.created_at, owned_by=row.tenant_id, afina=extension)
