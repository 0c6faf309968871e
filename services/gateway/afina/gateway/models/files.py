"""A registered model's files: listed from its export manifest, downloaded in streamed (ranged) reads.

Only what the ``ExportManifest`` lists can be named, by its file name: a caller never gives a store key,
and a file is served with the size and sha256 the manifest recorded (``ETag``), so a client can resume
a multi-GB GGUF with ``Range`` and check what it got.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from afina.core.artifacts import ExportManifest, FileEntry, ManifestInvalid, ServedArtifacts
from afina.core.db import repository as repo
from afina.core.db.models import Model
from afina.core.errors import AfinaError, InferenceUnavailable, NotFound
from afina.core.runtime import Runtime
from afina.gateway.models.protocol import ModelFile, ModelFileList

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeNotSatisfiable(AfinaError):
    http_status = 416
    error_type = "invalid_request_error"
    code = "range_not_satisfiable"


@dataclass(frozen=True)
class Download:
    """What the route streams: the bytes of ``[start, start + length)`` of a file of ``size`` bytes."""

    chunks: Iterator[bytes]
    filename: str
    size: int
    start: int
    length: int
    sha256: str
    partial: bool


def registered_model(runtime: Runtime, tenant_id: str, name: str) -> Model:
    with runtime.db.session() as session:
        row = repo.get_model(session, tenant_id, name)
    if row is None:
        raise NotFound(f"The model '{name}' does not exist or you do not have access to it.", param="model",
                       code="model_not_found")
    return row


def export_manifest(runtime: Runtime, row: Model) -> ExportManifest:
    try:
        served = ServedArtifacts.of_row(row.artifacts, row.name)
        manifest = ExportManifest.read(runtime.store, served.manifest)
    except ManifestInvalid:
        manifest = None
    if manifest is None:
        raise InferenceUnavailable(f"model {row.name} has no export manifest; export it again "
                                   f"(POST /v1/models/{row.name}/exports)")
    return manifest


def _entries(manifest: ExportManifest) -> list[tuple[ModelFile, FileEntry]]:
    rows: list[tuple[ModelFile, FileEntry]] = []

    def add(entry: FileEntry, kind: str, variant: str | None = None) -> None:
        filename = entry.key.rsplit("/", 1)[-1]
        rows.append((ModelFile(filename=filename, kind=kind, variant=variant,  # type: ignore[arg-type]
                               served=variant == manifest.serve, bytes=entry.bytes, sha256=entry.sha256,
                               download_url=f"/v1/models/{manifest.name}/files/{filename}"), entry))

    for variant, entry in manifest.gguf.items():
        add(entry, "gguf", variant)
    add(manifest.modelfile, "modelfile")
    add(manifest.verification, "verification")
    if manifest.lora_gguf is not None:
        add(manifest.lora_gguf, "lora_adapter")
    return rows


def list_files(runtime: Runtime, tenant_id: str, name: str) -> ModelFileList:
    manifest = export_manifest(runtime, registered_model(runtime, tenant_id, name))
    return ModelFileList(data=[listed for listed, _ in _entries(manifest)])


def parse_range(header: str | None, size: int) -> tuple[int, int, bool]:
    """``(start, length, partial)`` for a ``Range: bytes=a-b`` header (one range; suffix ranges too)."""
    if not header:
        return 0, size, False
    match = _RANGE.fullmatch(header.strip())
    if match is None or not (match.group(1) or match.group(2)):
        raise RangeNotSatisfiable(f"unsupported Range {header!r}: send one range, e.g. 'bytes=1048576-'",
                                  param="Range")
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    else:  # the last N bytes
        start, end = max(0, size - int(last)), size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(f"Range {header!r} is outside the file's {size} bytes", param="Range")
    return start, end - start + 1, True


def open_download(runtime: Runtime, tenant_id: str, name: str, filename: str, range_header: str | None) -> Download:
    manifest = export_manifest(runtime, registered_model(runtime, tenant_id, name))
    for listed, entry in _entries(manifest):
        if listed.filename == filename:
            start, length, partial = parse_range(range_header, entry.bytes)
            chunks = runtime.store.iter_chunks(entry.key, start, length)
            return Download(chunks=chunks, filename=filename, size=entry.bytes, start=start, length=length,
                            sha256=entry.sha256, partial=partial)
    raise NotFound(f"model {name} has no file {filename!r}; GET /v1/models/{name}/files lists them",
                   param="filename", code="file_not_found")
