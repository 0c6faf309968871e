"""``DatasetManifest``: what ingest commits and the trainer trains on.

Two kinds share the shape. A *version* (``datasets/<tenant>/v-…``) is one upload processed under one
set of options: it names its source, options, model and every artifact. A *job combination*
(``datasets/<tenant>/<hash>``) takes train (and test) from the training file's version and validation
from the validation file's, and names both versions. Either way ``splits`` is what a trainer reads,
each split checked against its sha256.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from afina.core.artifacts.manifest import FileEntry, Manifest, ManifestInvalid
from afina.core.store import ArtifactStore

DATASET_MANIFEST = "manifest.json"
SplitName = Literal["train", "validation", "test"]
SPLIT_NAMES: tuple[SplitName, ...] = ("train", "validation", "test")


class SplitFile(FileEntry):
    """One split's JSONL: its object, size, sha256, examples, and the at-rest encryption scheme if any."""

    examples: int = Field(ge=0)
    encryption: str | None = None


class DatasetSource(BaseModel):
    """The upload a version was made from."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    filename: str
    sha256: str
    key: str


class DatasetVersions(BaseModel):
    """The two versions a job combination joins."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    training: str
    validation: str


class DatasetManifest(Manifest):
    KIND: ClassVar[str] = "dataset"
    SCHEMA_VERSION: ClassVar[int] = 2

    format: Literal["openai-chat", "text", "mixed"] = Field(description="the kind of examples the splits hold")
    splits: dict[SplitName, SplitFile] = Field(description="only the non-empty splits")
    counts: dict[str, int] = Field(description="examples per split, and for a version the ingest counts")
    created_at: int
    # a version
    version: str | None = None
    source: DatasetSource | None = None
    options: dict[str, Any] | None = Field(None, description="the canonical ingest options (defaults included)")
    model: str | None = Field(None, description="the base model whose tokenizer measured the examples")
    pipeline_version: int | None = None
    summary: dict[str, Any] | None = Field(None, description="the ingest summary people read (counts, issues)")
    artifacts: dict[str, str] = Field(default_factory=dict, description="report, stats, preview: name -> key")
    # a job combination
    versions: DatasetVersions | None = None

    def examples(self, split: SplitName) -> int:
        entry = self.splits.get(split)
        return entry.examples if entry is not None else 0

    @classmethod
    def _upgrade(cls, version: int, data: dict[str, Any]) -> dict[str, Any]:
        # version 1 (before schema_version): the same fields, split entries without a guaranteed sha256
        return data


def read_split_records(store: ArtifactStore, entry: SplitFile, data_key: SecretStr | None) -> list[dict[str, Any]]:
    """One split's examples, checked against the manifest's sha256 and decrypted when ingest encrypted it at rest
    (with ``Settings.data_encryption_key``); ``ManifestInvalid`` when the bytes are not what ingest committed."""
    import hashlib

    import orjson

    from afina.core.datasets.at_rest import SCHEME, decrypt_bytes

    data = store.get_bytes(entry.key)
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ManifestInvalid(f"{entry.key} does not match the sha256 in its manifest; the prepared dataset was "
                              "changed after ingest")
    if entry.encryption:
        if entry.encryption != SCHEME:
            raise ManifestInvalid(f"{entry.key} is encrypted with {entry.encryption!r}, which this worker cannot read")
        data = decrypt_bytes(data, data_key)
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]
