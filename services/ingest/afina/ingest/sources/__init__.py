"""Container readers: an uploaded file in, ``SourceRow`` records out, streamed.

``open_rows`` is the only entry point. The container is decided by
``afina.core.datasets.formats.detect_container`` (the decision the gateway's upload sniff
makes too: magic bytes, then the name, unless ``options.container`` says), and the file goes
to that container's reader: JSONL, JSON array, CSV/TSV, Parquet, TXT, ZIP or tar, a single
gzip/bzip2/xz file (decompressed, then read under its name without the suffix), or a
whole-file Fernet token (``encryption.whole_file``: decrypted, then read likewise). Problems
with the whole file raise ``DatasetInvalid`` naming the file; problems with one record become
a ``SourceRow`` with ``value=None`` and an ``issue`` so the pipeline reports it and goes on.
File-level notes (a BOM removed, an encoding detected) are ``SourceRow``s at line 0 with
``value=None`` and a ``fixed``/``warning`` issue.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from afina.core.datasets.formats import SNIFF_BYTES, ContainerSpec, container, detect_container
from afina.core.datasets.options import IngestOptions
from afina.core.errors import DatasetInvalid
from afina.ingest.records import SourceRow
from afina.ingest.sources.archive import (
    NESTED_ARCHIVE,
    PAIRED_MEMBER_KEY,
    PAIRED_TEXT_KEY,
    ReadFile,
    decompress_single,
    read_archive,
)
from afina.ingest.sources.csv_rows import read_csv
from afina.ingest.sources.encoding import sniff_encoding
from afina.ingest.sources.json_array import read_json_array
from afina.ingest.sources.jsonl import read_jsonl
from afina.ingest.sources.parquet import read_parquet
from afina.ingest.sources.text import read_text_file

__all__ = ["PAIRED_MEMBER_KEY", "PAIRED_TEXT_KEY", "file_container", "open_rows"]


def open_rows(path: Path, filename: str, options: IngestOptions) -> Iterator[SourceRow]:
    """Every record of the uploaded file at ``path`` (named ``filename`` by the user), streamed.

    Raises ``DatasetInvalid`` (or ``InvalidRequest`` for a bad option) naming the file when
    the file as a whole cannot be read: empty, binary, undecodable, an unsafe archive.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetInvalid(f"{filename} was not found for reading", rule="missing_file", param="file")
    encryption = options.encryption
    if encryption is not None and encryption.whole_file:
        yield from _decrypted_rows(path, filename, options)
        return
    yield from _read_file(path, filename, filename, options, top_level=True)


def file_container(path: Path, name: str, options: IngestOptions, *, top_level: bool = True) -> ContainerSpec | None:
    """The container ingest reads the file at ``path`` (named ``name``) as; None: nothing tells (read as text).

    A whole-file encrypted upload is ``fernet`` at the top level; a declared container applies to the upload
    (or its plaintext), never to what an archive or a compressed file holds.
    """
    if top_level and options.encryption is not None and options.encryption.whole_file:
        return container("fernet")
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    return detect_container(head, name, options.container if top_level else "auto")


def _decrypted_rows(path: Path, filename: str, options: IngestOptions) -> Iterator[SourceRow]:
    from afina.ingest.crypto import decrypt_file, load_fernet

    assert options.encryption is not None
    fernet = load_fernet(options.encryption.key_env)
    with tempfile.TemporaryDirectory(prefix="afina-decrypt-") as tmp:
        plain = Path(tmp) / "plaintext"
        decrypt_file(path, plain, fernet, filename, options.encryption.key_env)
        plain_name = container("fernet").inner_name(filename)
        # rows keep the upload's name: that is the file the user knows; ``options.container`` names the plaintext's
        yield from _read_file(plain, filename, plain_name, options.model_copy(update={"encryption": None}),
                              top_level=True)


def _read_file(path: Path, source: str, name: str, options: IngestOptions, *, top_level: bool) -> Iterator[SourceRow]:
    """Rows of one file: ``source`` names it in rows and errors, ``name`` (its own file name) guides detection."""
    if path.stat().st_size == 0:
        raise DatasetInvalid(f"{source} is empty (0 bytes)", rule="empty_file", param="file")
    spec = file_container(path, name, options, top_level=top_level)
    if spec is None or spec.kind == "text":
        yield from _read_text(path, source, options, spec.name if spec is not None else "txt")
    elif spec.kind == "archive":
        if not top_level:
            raise DatasetInvalid(f"{source}: {NESTED_ARCHIVE}", rule="nested_archive", param="file")
        yield from read_archive(path, source, spec.name, options, _member_reader(options))
    elif spec.kind == "columnar":
        yield from read_parquet(path, source)
    elif spec.kind == "compressed":
        with tempfile.TemporaryDirectory(prefix="afina-decompress-") as tmp:
            plain = Path(tmp) / "decompressed"
            decompress_single(path, plain, source, spec.name)
            yield from _read_file(plain, source, spec.inner_name(name), options, top_level=False)
    else:
        raise DatasetInvalid(f"{source}: its name says it is Fernet-encrypted; set ingest_options.encryption with "
                             f"its key_env and whole_file: true", rule="encrypted_file", param="file")


def _read_text(path: Path, source: str, options: IngestOptions, kind: str) -> Iterator[SourceRow]:
    encoding = sniff_encoding(path, source, options.encoding)
    if kind == "jsonl":
        yield from read_jsonl(path, source, encoding)
    elif kind == "json":
        yield from read_json_array(path, source, encoding)
    elif kind == "csv":
        yield from read_csv(path, source, encoding, options.csv_delimiter)
    else:
        yield from read_text_file(path, source, encoding)


def _member_reader(options: IngestOptions) -> ReadFile:
    def read_member(path: Path, source: str, name: str) -> Iterator[SourceRow]:
        return _read_file(path, source, name, options, top_level=False)

    return read_member
