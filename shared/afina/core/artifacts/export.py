"""``ExportManifest`` (what the exporter commits) and ``ServedArtifacts`` (what the registry row points at).

The exporter writes the manifest last under ``models/<tenant>/<job>/``: every GGUF variant, the
Modelfile and the verification report with size and sha256, and which variant is served. The
registry row keeps only ``ServedArtifacts``, the keys the gateway needs to serve without reading
the store: the manifest stays the one full record.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from afina.core.artifacts.manifest import FileEntry, Manifest, ManifestInvalid
from afina.core.store import ArtifactStore

EXPORT_MANIFEST = "manifest.json"


class _ServesOneOfItsVariants(Manifest):
    """A record of GGUF variants (``gguf``: variant -> file or key) of which one, ``serve``, is served."""

    serve: str
    gguf: dict[str, Any]

    @model_validator(mode="after")
    def _serves_a_listed_variant(self) -> _ServesOneOfItsVariants:
        if self.serve not in self.gguf:
            raise ValueError(f"serve names {self.serve!r}, which is not among the variants {sorted(self.gguf)}")
        return self


class ExportManifest(_ServesOneOfItsVariants):
    KIND: ClassVar[str] = "export"
    SCHEMA_VERSION: ClassVar[int] = 2

    name: str = Field(description="the model's public name (ft:...)")
    job_id: str
    tenant_id: str
    base_model: str
    family: str
    serve: str = Field(description="the variant the gateway serves")
    adapter: str = Field(description="the adapter's store prefix")
    gguf: dict[str, FileEntry] = Field(description="variant (f16, q8_0, q4_k_m, ...) -> its GGUF file")
    modelfile: FileEntry
    verification: FileEntry
    lora_gguf: FileEntry | None = Field(None, description="the LoRA-only GGUF adapter, when the job asked for one")
    timings: dict[str, float] = Field(default_factory=dict)
    created_at: int

    @classmethod
    def _upgrade(cls, version: int, data: dict[str, Any]) -> dict[str, Any]:
        # version 1 said ``"format": "afina.model/1"`` and had the same fields
        return {key: value for key, value in data.items() if key != "format"}

    def files(self) -> list[FileEntry]:
        return [*self.gguf.values(), self.modelfile, self.verification, *([self.lora_gguf] if self.lora_gguf else [])]

    def complete_in(self, store: ArtifactStore, variants: tuple[str, ...]) -> bool:
        """Every wanted variant is listed and every listed file is in the store with its size and sha256."""
        return set(variants) <= set(self.gguf) and all(entry.matches(store) for entry in self.files())

    def served(self, adapter_prefix: str, manifest_key: str) -> ServedArtifacts:
        return ServedArtifacts.build(gguf={variant: entry.key for variant, entry in self.gguf.items()},
                                     serve=self.serve, modelfile=self.modelfile.key, manifest=manifest_key,
                                     adapter=adapter_prefix)


class ServedArtifacts(_ServesOneOfItsVariants):
    """The registry row's ``artifacts``: the store keys the gateway serves from."""

    KIND: ClassVar[str] = "served artifacts"
    SCHEMA_VERSION: ClassVar[int] = 2

    gguf: dict[str, str] = Field(description="variant -> GGUF key")
    serve: str
    modelfile: str
    manifest: str = Field(description="the export manifest's key: sizes and sha256 of every file")
    adapter: str

    @property
    def served_key(self) -> str:
        return self.gguf[self.serve]

    @classmethod
    def of_row(cls, artifacts: Any, model_name: str) -> ServedArtifacts:
        """A registry row's ``artifacts`` column, checked; ``ManifestInvalid`` naming the model otherwise."""
        from pydantic import ValidationError

        try:
            return cls.model_validate(artifacts)
        except ValidationError as exc:
            raise ManifestInvalid(f"model {model_name} has no servable GGUF registered "
                                  f"({exc.errors()[0].get('msg', 'invalid')})") from None
