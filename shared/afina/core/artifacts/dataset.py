"""``DatasetManifest``: what ingest commits and the trainer trains on.

Two kinds share the shape. A *version* (``datasets/<tenant>/v-…``) is one upload processed under one
set of options: it names its source, options, model and every artifact. A *job combination*
(``datasets/<tenant>/<hash>``) takes train (and test) from the training file's version and validation
from the validation file's, and names both versions. Either way ``splits`` is what a trainer reads,
each split checked against its sha256.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from afina.core.artifacts.manifest import FileEntry, Manifest

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
