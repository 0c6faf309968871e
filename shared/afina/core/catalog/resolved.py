"""``ResolvedBaseModel``: a job's base model, resolved once when the job is created and stored with it.

Resolving a name can read files (a folder's ``config.json``, a ``store://`` model's tokenizer
config, a GGUF header) and depends on the operator's allowed directories. Doing it once, at job
creation where the request is checked, and storing the answer means every stage trains, exports
and serves the same model: a worker rebuilds the ``BaseModelSpec`` from this record without
reading the model's files again, and checks a local path against its own allowed directories.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from afina.core.catalog.registry import catalog_model, family_by_name
from afina.core.catalog.sources import (
    GgufFileSource,
    GgufPackageSource,
    HubSource,
    StoreSource,
    find_hub_snapshot,
    parse_model_reference,
)
from afina.core.catalog.spec import BaseModelSpec
from afina.core.errors import InvalidRequest

SourceKind = Literal["catalog", "package", "gguf_file", "local", "hub", "store"]


class ResolvedBaseModel(BaseModel):
    """What a job's ``model`` named, as resolved at creation: enough to rebuild its ``BaseModelSpec``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = 1
    id: str = Field(description="the catalog id, or the reference itself for a model outside the catalog")
    family: str = Field(description="the chat family (the job's chat_family when it set one)")
    source: SourceKind
    reference: str = Field(description="the name the weights are found by: catalog id, path, store:// URI, Hub id")
    revision: str | None = Field(None, description="the Hub snapshot resolved at creation, for a Hub model")
    hf_repo: str
    parameters: int
    context_length: int

    @classmethod
    def of(cls, spec: BaseModelSpec) -> ResolvedBaseModel:
        source = spec.source
        revision = None
        if spec.catalog:
            kind: SourceKind = "catalog"
            reference = spec.id
        elif isinstance(source, StoreSource):
            kind, reference = "store", source.uri
        elif isinstance(source, HubSource):
            kind, reference = "hub", source.repo
            snapshot = find_hub_snapshot(source.repo)
            revision = snapshot.name if snapshot is not None else None
        elif isinstance(source, GgufFileSource):
            kind, reference = "gguf_file", str(source.path)
        elif isinstance(source, GgufPackageSource):
            kind, reference = "package", spec.id
        else:
            kind, reference = "local", str(source.path)
        return cls(id=spec.id, family=spec.family.name, source=kind, reference=reference, revision=revision,
                   hf_repo=spec.hf_repo, parameters=spec.parameters, context_length=spec.context_length)

    def spec(self, allowed_model_dirs: Sequence[Path] | None = None) -> BaseModelSpec:
        """The ``BaseModelSpec`` this record names, without reading the model's files.

        ``allowed_model_dirs`` (the worker's settings) re-checks a local path: an operator who narrowed
        the list after the job was created is obeyed by the worker too.
        """
        family = family_by_name(self.family)
        if self.source == "catalog":
            entry = catalog_model(self.id)
            if entry is None:
                raise InvalidRequest(f"base model {self.id!r} is no longer in afina's catalog", param="model",
                                     code="model_not_available")
            return entry if entry.family.name == family.name else replace(entry, family=family)
        source = parse_model_reference(self.reference, allowed_model_dirs=allowed_model_dirs)
        if source is None:
            raise InvalidRequest(f"base model {self.reference!r} is no longer on this machine", param="model",
                                 code="model_not_available")
        return BaseModelSpec(id=self.id, display_name=self.id, family=family, source=source,
                             parameters=self.parameters, context_length=self.context_length, hf_repo=self.hf_repo,
                             catalog=False)
