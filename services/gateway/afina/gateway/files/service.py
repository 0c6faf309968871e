"""File logic, callable without HTTP: store a checked upload, list, fetch, delete.

An upload becomes visible only once both its object and its row exist: the object
is written first, and removed again if the row cannot be committed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from afina.core import ids
from afina.core.datasets.layout import raw_file_key
from afina.core.db import repository as repo
from afina.core.db.models import File
from afina.core.errors import InvalidRequest
from afina.core.metrics import FILES_UPLOADED_BYTES
from afina.core.runtime import Runtime
from afina.gateway.files.protocol import FILE_PURPOSES, FileList, FileObject
from afina.gateway.files.upload import SpooledUpload


def check_purpose(fields: dict[str, str], *, required: bool) -> None:
    """Refuse a purpose afina does not serve (``fine-tune`` only)."""
    purpose = fields.get("purpose")
    if purpose is None:
        if required:
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
        return
    if purpose not in FILE_PURPOSES:
        raise InvalidRequest(f"Invalid 'purpose': {purpose!r}; afina accepts {list(FILE_PURPOSES)}.",
                             param="purpose")


def store_upload(runtime: Runtime, tenant_id: str, upload: SpooledUpload) -> FileObject:
    """Move a checked upload into the store and register it; the sha256 is the store's own."""
    check_purpose(upload.fields, required=True)
    file_id = ids.file_id()
    key = raw_file_key(tenant_id, file_id, upload.filename)
    info = runtime.store.put_file(key, upload.path)
    try:
        with runtime.db.session() as session:
            row = File(id=file_id, tenant_id=tenant_id, filename=upload.filename, purpose=upload.fields["purpose"],
                       bytes=info.size, sha256=info.sha256 or "", object_key=key, status="processed")
            session.add(row)
    except BaseException:
        runtime.store.delete(key)
        raise
    FILES_UPLOADED_BYTES.inc(info.size)
    return FileObject.from_row(row)


def list_files(runtime: Runtime, tenant_id: str, *, purpose: str | None, after: str | None, limit: int,
               order: str) -> FileList:
    with runtime.db.session() as session:
        rows = repo.list_files(session, tenant_id, purpose)
    if order == "asc":
        rows.reverse()
    if after:
        position = next((index for index, row in enumerate(rows) if row.id == after), None)
        if position is None:
            raise InvalidRequest(f"Invalid 'after': no such file {after!r}.", param="after")
        rows = rows[position + 1:]
    page = [FileObject.from_row(row) for row in rows[:limit]]
    return FileList(data=page, has_more=len(rows) > limit,
                    first_id=page[0].id if page else None, last_id=page[-1].id if page else None)


def get_file(runtime: Runtime, tenant_id: str, file_id: str) -> File:
    with runtime.db.session() as session:
        return repo.get_file(session, tenant_id, file_id)


def delete_file(runtime: Runtime, tenant_id: str, file_id: str) -> None:
    """Remove the object, then commit the row's removal (a failed delete leaves both in place)."""
    with runtime.db.session() as session:
        row = repo.get_file(session, tenant_id, file_id)
        runtime.store.delete(row.object_key)
        session.delete(row)


def open_content(runtime: Runtime, tenant_id: str, file_id: str) -> tuple[File, Iterator[bytes]]:
    """The row and its bytes; the first chunk is read here, so a missing object is a 404, not a cut stream."""
    row = get_file(runtime, tenant_id, file_id)
    chunks = runtime.store.iter_chunks(row.object_key)
    first = next(chunks, b"")
    return row, itertools.chain([first], chunks)
