"""File objects as OpenAI's API and the ``openai`` client shape them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from afina.core.db.models import File

FILE_PURPOSES = ("fine-tune", "batch")  # batch: the requests of a /v1/batches batch, not ingested


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None  # epoch seconds; past it the file is gone (afina.core.file_expiry)
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None

    @classmethod
    def from_row(cls, row: File) -> FileObject:
        return cls(id=row.id, bytes=row.bytes, created_at=row.created_at, expires_at=row.expires_at,
                   filename=row.filename, purpose=row.purpose, status=row.status, status_details=row.status_details)


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class IngestArtifacts(BaseModel):
    """Where the ingest outputs of a file can be downloaded (paths under the API's base URL)."""

    report: str
    stats: str
    preview: str
    token_lengths_png: str


class IngestStatus(BaseModel):
    """How a fine-tune file's ingest went: status, progress while it runs, counts and issues when done.

    ``status`` is the file's (``uploaded`` while ingest runs or waits, ``processed``, ``error``);
    ``issues`` counts report lines by rule and action; ``first_errors`` names the first error rows
    (file, line, field, rule) of a file that failed.
    """

    object: Literal["file.ingest"] = "file.ingest"
    file_id: str
    status: str
    status_details: str | None = None
    options: dict[str, Any] | None = None
    dataset_version: str | None = None
    progress: dict[str, Any] | None = None
    counts: dict[str, Any] | None = None
    splits: dict[str, int] | None = None
    issues: dict[str, dict[str, int]] | None = None
    first_errors: list[dict[str, Any]] | None = None
    stats: dict[str, Any] | None = None
    artifacts: IngestArtifacts
