"""Container readers: an uploaded file in, ``SourceRow`` records out, streamed.

``open_rows`` is the only entry point. It decides the container (magic bytes, then the
name, unless ``options.container`` says), the text encoding, and hands the file to one
reader: JSONL, JSON array, CSV/TSV, Parquet, TXT, ZIP or tar(.gz). Problems with the
whole file raise ``DatasetInvalid`` naming the file; problems with one record become a
``SourceRow`` with ``value=None`` and an ``issue`` so the pipeline reports it and goes on.
File-level notes (a BOM removed, an encoding detected) are ``SourceRow``s at line 0 with
``value=None`` and a ``fixed``/``warning`` issue.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from afina.core.datasets.options import IngestOptions
from afina.core.errors import DatasetInvalid
from afina.ingest.records import SourceRow
from afina.ingest.sources.archive import PAIRED_MEMBER_KEY, PAIRED_TEXT_KEY, decompress_single, read_archive
from afina.ingest.sources.csv_rows import read_csv
from afina.ingest.sources.detect import ENCRYPTED_SUFFIXES, binary_container, strip_suffix, text_container
from afina.ingest.sources.encoding import sniff_encoding
from afina.ingest.sources.json_array import read_json_array
from afina.ingest.sources.jsonl import read_jsonl
from afina.ingest.sources.parquet import read_parquet
from afina.ingest.sources.text import read_text_file

__all__ = ["PAIRED_MEMBER_KEY", "PAIRED_TEXT_KEY", "open_rows"]

_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz")


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


def _decrypted_rows(path: Path, filename: str, options: IngestOptions) -> Iterator[SourceRow]:
    from afina.ingest.crypto import decrypt_file, load_fernet

    assert options.encryption is not None
    fernet = load_fernet(options.encryption.key_env)
    with tempfile.TemporaryDirectory(prefix="afina-decrypt-") as tmp:
        plain = Path(tmp) / "plaintext"
        decrypt_file(path, plain, fernet, filename, options.encryption.key_env)
        plain_name = strip_suffix(filename, ENCRYPTED_SUFFIXES)
        # rows keep the upload's name: that is the file the user knows
        yield from _read_file(plain, filename, plain_name, options, top_level=True)


def _read_file(path: Path, source: str, name: str, options: IngestOptions, *, top_level: bool) -> Iterator[SourceRow]:
    """Rows of one file: ``source`` names it in rows and errors, ``name`` (its own file name) guides detection."""
    if path.stat().st_size == 0:
        raise DatasetInvalid(f"{source} is empty (0 bytes)", rule="empty_file", param="file")
    declared = options.container if top_level else "auto"
    container = binary_container(path, declared)
    if container in ("zip", "tar"):
        if not top_level:
            raise DatasetInvalid(f"{source}: archives inside archives are not read", rule="nested_archive",
                                 param="file")
        yield from read_archive(path, source, container, options, _member_reader(options))
        return
    if container == "parquet":
        yield from read_parquet(path, source)
        return
    if container == "gzip":
        with tempfile.TemporaryDirectory(prefix="afina-gunzip-") as tmp:
            plain = Path(tmp) / "decompressed"
            decompress_single(path, plain, source)
            yield from _read_file(plain, source, strip_suffix(name, _COMPRESSED_SUFFIXES), options, top_level=False)
        return
    encoding = sniff_encoding(path, source, options.encoding)
    kind = text_container(path, name, encoding, declared)
    if kind == "jsonl":
        yield from read_jsonl(path, source, encoding)
    elif kind == "json":
        yield from read_json_array(path, source, encoding)
    elif kind == "csv":
        yield from read_csv(path, source, encoding, options.csv_delimiter)
    else:
        yield from read_text_file(path, source, encoding)


def _member_reader(options: IngestOptions):  # noqa: ANN202 - archive.ReadFile
    def read_member(path: Path, source: str, name: str) -> Iterator[SourceRow]:
        return _read_file(path, source, name, options, top_level=False)

    return read_member
