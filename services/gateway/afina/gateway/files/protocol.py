"""File objects as OpenAI's API and the ``openai`` client shape them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from afina.core.db.models import File

FILE_PURPOSES = ("fine-tune",)


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None

    @classmethod
    def from_row(cls, row: File) -> FileObject:
        return cls(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                   purpose=row.purpose, status=row.status)


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
