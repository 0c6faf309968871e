"""The first look at an upload: is it a dataset container afina reads at all?

The gateway runs this while the upload streams in, before anything is stored, so an
obvious mistake (random binary, an empty file, a PNG, a JSON array of numbers) is a 400
at once instead of a file that fails later. The container is decided by
``afina.core.datasets.formats.detect_container``, the same decision ingest makes, from the
same first ``SNIFF_BYTES`` and the same name; the sniff then checks only what is cheap: the
first JSONL line, the start of a JSON array, a CSV's first row. Row-level problems are left
to the ingest pipeline, which reports them per row; one of them is a line of a line-based
container (JSONL, CSV) past ``MAX_LINE_BYTES``, which ingest never reads. In ``mode: strict``
such a row fails the whole file, so there the sniff refuses the upload at the first line past
the limit (with the options sent before the file). Archives get one more
check once the whole upload is on disk (``check_archive``): members that escape their folder
and members that expand past the limits are refused before the upload is stored.

Encodings: the sniff never refuses text for not being UTF-8 (a latin-1 file is decoded
by ingest and the decoding reported); it refuses bytes that are not text at all.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

import orjson

from afina.core.datasets.formats import (
    MAX_ARCHIVE_MEMBER_BYTES,
    MAX_ARCHIVE_MEMBERS,
    MAX_ARCHIVE_TOTAL_BYTES,
    MAX_COMPRESSION_RATIO,
    MAX_LINE_BYTES,
    RATIO_CHECK_MIN_BYTES,
    SNIFF_BYTES,
    SUPPORTED,
    UTF8_BOM,
    WHOLE_TEXT_FORMATS,
    ContainerSpec,
    container,
    container_from_magic,
    decode_text,
    detect_container,
    looks_binary,
)
from afina.core.datasets.options import IngestOptions
from afina.core.errors import InvalidRequest

_BLANK = b" \t\r\n\x0c" + UTF8_BOM + b"\xff\xfe"


class UploadSniffer:
    """Fed the upload chunk by chunk; ``feed`` or ``finish`` raises ``InvalidRequest`` if it is no dataset afina reads.

    ``container`` is the decision, a ``ContainerSpec`` name of ``afina.core.datasets.formats``
    (``jsonl``, ``json``, ``csv``, ``txt``, ``parquet``, ``zip``, ``tar``, ``gzip``, ``bzip2``, ``xz``,
    ``fernet``): the name ingest reads the file as.
    """

    def __init__(self, filename: str, options: IngestOptions | None = None) -> None:
        self.filename = filename
        self.options = options or IngestOptions()
        self.size = 0
        self.spec: ContainerSpec | None = None
        self._head = bytearray()
        self._tail = b""
        self._line_bytes = 0  # bytes of the line in progress (since the last newline)
        self._line_number = 1  # 1-based number of the line in progress

    @property
    def container(self) -> str | None:
        return self.spec.name if self.spec is not None else None

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        if len(self._head) < SNIFF_BYTES:
            self._head += chunk[: SNIFF_BYTES - len(self._head)]
        self._tail = (self._tail + chunk)[-8:]
        if self.spec is None and len(self._head) >= SNIFF_BYTES:
            self._decide()
        self._track_lines(chunk)

    def finish(self) -> None:
        if self.spec is None:
            self._decide()
        if self.container == "parquet" and not self._tail.endswith(b"PAR1"):
            self._reject("it starts like Parquet but does not end with Parquet's footer (truncated upload?)")

    # the line limit ----------------------------------------------------------

    def _track_lines(self, chunk: bytes) -> None:
        """In strict mode, every line's length against ``MAX_LINE_BYTES``, counted as ingest's line reader counts it.

        Before the decision (the head) no line can be over the limit: the head is smaller than it.
        """
        checked = self.spec is not None and self.spec.line_based and self.options.mode == "strict"
        newline = chunk.find(b"\n")
        if newline < 0:
            self._line_bytes += len(chunk)
            if checked:
                self._check_line(self._line_bytes, self._line_number)
            return
        if checked:
            self._check_line(self._line_bytes + newline, self._line_number)
            if len(chunk) > MAX_LINE_BYTES:  # only then can a whole line lie inside this chunk
                number, start = self._line_number + 1, newline + 1
                while (end := chunk.find(b"\n", start)) >= 0:
                    self._check_line(end - start, number)
                    number, start = number + 1, end + 1
        self._line_number += chunk.count(b"\n")
        self._line_bytes = len(chunk) - chunk.rfind(b"\n") - 1
        if checked:
            self._check_line(self._line_bytes, self._line_number)

    def _check_line(self, length: int, number: int) -> None:
        if length > MAX_LINE_BYTES:
            kind = self.spec.name.upper() if self.spec is not None else "the file"
            raise InvalidRequest(f"{self.filename}: line {number} is longer than the {MAX_LINE_BYTES // 2**20} MiB "
                                 f"per-line limit, so ingest would not read it ({kind} needs one record per line), "
                                 f"and ingest_options.mode is 'strict'", param="file", code="line_too_long")

    # the decision -----------------------------------------------------------

    def _decide(self) -> None:
        head = bytes(self._head)
        if not head.strip(_BLANK):
            self._reject("the file is empty", code="empty_file")
        options = self.options
        if options.encryption is not None and options.encryption.whole_file:
            self.spec = container("fernet")  # one Fernet token: ingest decrypts, then reads the plaintext
            return
        declared = options.container
        spec = detect_container(head, self.filename, declared)
        magic = container_from_magic(head, self.filename)
        if spec is not None and spec.kind != "text":
            self.spec = self._binary(spec, magic, declared)
            return
        if looks_binary(head):
            self._reject(f"its bytes are not text, and it is none of {SUPPORTED}", code="unsupported_file_type")
        if magic is not None:
            self._reject(f"it is a {magic.name} file, but ingest_options.container says {declared}")
        if spec is None:
            if options.format not in WHOLE_TEXT_FORMATS:
                self._reject("the format cannot be told from its name or its first bytes; name it .jsonl, .json, "
                             ".csv or .txt, or set ingest_options.container", code="unsupported_file_type")
            spec = container("txt")
        self.spec = spec
        text = decode_text(head).lstrip("\ufeff \t\r\n")
        complete = len(head) < SNIFF_BYTES
        if spec.name == "jsonl":
            self._check_first_jsonl_line(head)
        elif spec.name == "json":
            self._check_json_start(text)
        elif spec.name == "csv":
            self._check_csv(text, complete=complete)

    def _binary(self, spec: ContainerSpec, magic: ContainerSpec | None, declared: str) -> ContainerSpec:
        """A declared binary container must start like one; an encrypted name needs ``encryption.whole_file``."""
        if spec.kind == "encrypted":
            self._reject("its name says it is Fernet-encrypted; set ingest_options.encryption with its key_env and "
                         "whole_file: true", code="unsupported_file_type")
        # a declared tar may be compressed; ingest opens whichever compression it has
        matches = magic is not None and (magic.name == spec.name or (spec.name == "tar" and magic.kind == "compressed"))
        if declared != "auto" and not matches:
            self._reject(f"it was declared {declared} but its first bytes are not a {declared} file")
        return spec

    def _check_first_jsonl_line(self, head: bytes) -> None:
        text = decode_text(head)
        lines = text.split("\n")
        for number, line in enumerate(lines, start=1):
            stripped = line.strip().lstrip("\ufeff")
            if not stripped:
                continue
            complete = number < len(lines) or len(head) < SNIFF_BYTES
            if not complete:  # a first line longer than the head: check how it starts
                if not stripped.startswith("{"):
                    self._reject(f"line {number} does not start a JSON object")
                return
            try:
                value = orjson.loads(stripped)
            except orjson.JSONDecodeError as exc:
                self._reject(f"line {number} is not valid JSON ({exc})")
            if not isinstance(value, dict):
                self._reject(f"line {number} is a JSON {type(value).__name__}, expected one object per line")
            return

    def _check_json_start(self, text: str) -> None:
        if text.startswith("{"):
            return  # one object (a record, or {"data": [...]}) or JSONL named .json: ingest decides
        if not text.startswith("["):
            self._reject("it does not start with a JSON array or object")
        rest = text[1:].lstrip()
        if rest.startswith("]"):
            self._reject("it is an empty JSON array", code="empty_file")
        if rest and not rest.startswith("{"):
            kind = {"[": "arrays", '"': "strings"}.get(rest[0], "numbers or literals")
            self._reject(f"it is a JSON array of {kind}, expected an array of objects (one per example)")

    def _check_csv(self, text: str, *, complete: bool) -> None:
        lines = [line for line in text.splitlines() if line.strip()]
        if complete and len(lines) < 2:
            self._reject("a CSV file needs a header row and at least one data row", code="empty_file")

    def _reject(self, why: str, *, code: str = "invalid_file_format") -> None:
        raise InvalidRequest(f"{self.filename} is not a dataset afina can read: {why}", param="file", code=code)


def check_archive(path: Path, filename: str, *, max_expanded_bytes: int) -> None:
    """Refuse a ZIP whose members escape their folder or whose declared sizes exceed the archive limits.

    The limits are ingest's (``afina.core.datasets.formats``), with ``max_expanded_bytes`` (the
    operator's setting) lowering the total. Reads only the central directory (cheap). Declared
    sizes can lie, so the ingest reader still counts bytes while it extracts; this check turns
    the common bomb and traversal into a 400 before anything is stored.
    """
    try:
        archive = zipfile.ZipFile(path)
    # a corrupt central directory also raises these: a version zipfile does not read, a name not in UTF-8
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
        raise InvalidRequest(f"{filename} is not a valid ZIP archive ({exc})", param="file",
                             code="invalid_file_format") from None
    with archive:
        members = archive.infolist()
        max_expanded_bytes = min(max_expanded_bytes, MAX_ARCHIVE_TOTAL_BYTES)  # never more than ingest extracts
        if len(members) > MAX_ARCHIVE_MEMBERS:
            raise InvalidRequest(f"{filename} has {len(members)} members; at most {MAX_ARCHIVE_MEMBERS} are read",
                                 param="file", code="archive_too_large")
        expanded = 0
        for member in members:
            name = member.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            is_link = stat.S_ISLNK(member.external_attr >> 16)
            if name.startswith("/") or ".." in parts or (parts and parts[0].endswith(":")) or is_link:
                why = "is a symbolic link" if is_link else "points outside the archive (path traversal)"
                raise InvalidRequest(f"{filename}: member {member.filename!r} {why}; refused", param="file",
                                     code="unsafe_archive_member")
            if member.file_size > MAX_ARCHIVE_MEMBER_BYTES:
                raise InvalidRequest(f"{filename}: member {member.filename!r} expands to {member.file_size} bytes, "
                                     f"over the {MAX_ARCHIVE_MEMBER_BYTES // 2**30} GiB per-file limit; refused",
                                     param="file", code="archive_too_large")
            expanded += member.file_size
            ratio = member.file_size / max(member.compress_size, 1)
            if member.file_size > RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
                raise InvalidRequest(f"{filename}: member {member.filename!r} expands {ratio:.0f}x to "
                                     f"{member.file_size} bytes; refused as a decompression bomb", param="file",
                                     code="archive_too_large")
            if expanded > max_expanded_bytes:
                raise InvalidRequest(f"{filename} expands to more than {max_expanded_bytes} bytes (at member "
                                     f"{member.filename!r}); refused as a decompression bomb", param="file",
                                     code="archive_too_large")
