"""The base of every stage manifest: versioned JSON in the store, read and written in one way.

A manifest is a stage's commit marker: it is written last, after every object it names, so a
reader that finds it finds everything it lists. ``read`` returns None for a manifest that is not
there (the stage has not committed), raises ``ManifestInvalid`` for one that is there but cannot be
trusted (not JSON, missing fields, written by a newer afina), and upgrades an older one.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from afina.core.errors import AfinaError, ObjectMissing
from afina.core.store import ArtifactStore, ObjectInfo
from afina.core.store.base import CHUNK_BYTES


class ManifestInvalid(AfinaError):
    """A manifest that exists but cannot be read: the stage that wrote it must run again."""

    http_status = 500
    error_type = "server_error"
    code = "manifest_invalid"


class FileEntry(BaseModel):
    """One object a manifest names: where it is, how big, and its sha256 (checked before it is trusted)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @classmethod
    def of(cls, info: ObjectInfo) -> FileEntry:
        if info.sha256 is None:
            raise ValueError(f"{info.key}: a manifest entry needs the sha256 its write computed")
        return cls(key=info.key, bytes=info.size, sha256=info.sha256)

    def matches(self, store: ArtifactStore) -> bool:
        """The object is in the store with this size and this sha256 (read through once to hash it)."""
        import hashlib

        try:
            if store.stat(self.key).size != self.bytes:
                return False
            digest = hashlib.sha256()
            for chunk in store.iter_chunks(self.key):
                digest.update(chunk)
        except ObjectMissing:
            return False
        return digest.hexdigest() == self.sha256


class Manifest(BaseModel):
    """A versioned stage manifest. Subclasses set ``KIND``, ``SCHEMA_VERSION`` and, for older shapes, ``_upgrade``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    KIND: ClassVar[str] = "manifest"
    SCHEMA_VERSION: ClassVar[int] = 1
    READ_CHUNK: ClassVar[int] = CHUNK_BYTES

    schema_version: int = Field(description="the shape this manifest was written in")

    @model_validator(mode="before")
    @classmethod
    def _versioned(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        version = data.get("schema_version", 1)  # a manifest from before versioning is version 1
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"schema_version must be a positive integer, got {version!r}")
        if version > cls.SCHEMA_VERSION:
            raise ValueError(f"written by a newer afina (schema_version {version}, this one reads up to "
                             f"{cls.SCHEMA_VERSION}); upgrade this worker")
        upgraded = dict(data)
        while version < cls.SCHEMA_VERSION:
            upgraded = cls._upgrade(version, upgraded)
            version += 1
        upgraded["schema_version"] = cls.SCHEMA_VERSION
        return upgraded

    @classmethod
    def _upgrade(cls, version: int, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` of ``version`` in the shape of ``version + 1``."""
        return data

    @classmethod
    def parse(cls, raw: bytes, key: str) -> Self:
        try:
            return cls.model_validate(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            raise ManifestInvalid(f"{cls.KIND} manifest {key} is not JSON ({exc})") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ())) or "(top level)"
            reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            raise ManifestInvalid(f"{cls.KIND} manifest {key}: {where}: {reason}") from None

    @classmethod
    def read(cls, store: ArtifactStore, key: str) -> Self | None:
        """The manifest at ``key``; None when the stage has not committed one."""
        try:
            raw = store.get_bytes(key)
        except ObjectMissing:
            return None
        return cls.parse(raw, key)

    @classmethod
    def build(cls, **fields: Any) -> Self:
        """A manifest of the current version (the writer's constructor)."""
        return cls.model_validate({"schema_version": cls.SCHEMA_VERSION, **fields})

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2)

    def write(self, store: ArtifactStore, key: str) -> ObjectInfo:
        """Put the manifest at ``key``: call it last, after every object it names is in the store."""
        return store.put_bytes(key, self.to_json())
