"""The first look at an upload: is it a dataset container afina reads at all?

The gateway runs this while the upload streams in, before anything is stored, so an
obvious mistake (random binary, an empty file, a PNG, a JSON array of numbers) is a 400
at once instead of a file that fails later. It decides the container from magic bytes,
the file name and the first bytes of text, and checks only what is cheap: the first
JSONL line, the start of a JSON array, a CSV's first row. Row-level problems are left to
the ingest pipeline, which reports them per row. Archives get one more check once the
whole upload is on disk (``check_archive``): members that escape their folder and
members that expand past a limit are refused before the upload is stored.

Encodings: the sniff never refuses text for not being UTF-8 (a latin-1 file is decoded
by ingest and the decoding reported); it refuses bytes that are not text at all.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

import orjson

from afina.core.datasets.options import IngestOptions
from afina.core.errors import InvalidRequest

HEAD_BYTES = 64 * 1024
MAX_LINE_BYTES = 64 * 1024 * 1024
# the ingest reader's own caps (afina.ingest.sources.limits) are the same; checked here too so the
# common bomb is a 400 at upload instead of a failed file later
MAX_ARCHIVE_MEMBERS = 10_000
MAX_COMPRESSION_RATIO = 200
RATIO_CHECK_MIN_BYTES = 16 * 1024 * 1024

TEXT_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
                 ".txt": "txt", ".text": "txt", ".md": "txt", ".log": "txt"}
BINARY_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".zip": "zip", ".tar": "tar", ".tgz": "tar",
                   ".gz": "tar"}
SUPPORTED = "JSONL, JSON, CSV, TXT, Parquet, ZIP or tar.gz"
BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")


def container_from_magic(head: bytes) -> str | None:
    """``zip``, ``tar`` (plain or gzip'd), ``parquet`` from the first bytes; None for anything else."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"PAR1"):
        return "parquet"
    return None


def looks_binary(head: bytes) -> bool:
    """NUL bytes or many control characters: not text in any encoding ingest decodes (UTF-16 has a BOM)."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return False
    if b"\x00" in head:
        return True
    sample = head[:8192]
    controls = sum(1 for byte in sample if byte < 32 and byte not in (9, 10, 12, 13))
    return controls > max(2, len(sample) // 100)


def decode_text(data: bytes) -> str:
    """Text for a cheap look: UTF-8 (BOM stripped), UTF-16 by BOM, else latin-1 (never fails)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data[: len(data) - len(data) % 2].decode("utf-16", "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= len(data) - 3:  # a multi-byte character cut by the head's end
            return data[: exc.start].decode("utf-8")
        return data.decode("latin-1")


class UploadSniffer:
    """Fed the upload chunk by chunk; ``finish`` raises ``InvalidRequest`` if it is no dataset afina reads.

    ``container`` is the decision (``jsonl``, ``json``, ``csv``, ``txt``, ``parquet``, ``zip``, ``tar``).
    """

    def __init__(self, filename: str, options: IngestOptions | None = None) -> None:
        self.filename = filename
        self.options = options or IngestOptions()
        self.size = 0
        self.container: str | None = None
        self._head = bytearray()
        self._tail = b""
        self._line_bytes = 0  # bytes since the last newline (text containers)
        self._decided = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        self._tail = (self._tail + chunk)[-8:]
        if not self._decided and len(self._head) >= HEAD_BYTES:
            self._decide()
        if self.container in ("jsonl", "csv", "json", "txt"):
            self._track_lines(chunk)

    def _track_lines(self, chunk: bytes) -> None:
        newline = chunk.rfind(b"\n")
        self._line_bytes = len(chunk) - newline - 1 if newline >= 0 else self._line_bytes + len(chunk)
        if self.container == "jsonl" and self._line_bytes > MAX_LINE_BYTES:
            raise InvalidRequest(f"{self.filename}: a line is longer than {MAX_LINE_BYTES // 2**20} MB; "
                                 "JSONL needs one record per line", param="file", code="invalid_file_format")

    def finish(self) -> None:
        if not self._decided:
            self._decide()
        if self.container == "parquet" and not self._tail.endswith(b"PAR1"):
            self._reject("it starts like Parquet but does not end with Parquet's footer (truncated upload?)")

    # the decision -----------------------------------------------------------

    def _decide(self) -> None:
        self._decided = True
        head = bytes(self._head)
        if not head.strip(b" \t\r\n\x0c" + b"".join(BOMS)):
            self._reject("the file is empty", code="empty_file")
        explicit = self.options.container if self.options.container != "auto" else None
        magic = container_from_magic(head)
        suffix = PurePosixPath(self.filename.lower()).suffix
        if explicit in ("zip", "tar", "parquet") or (explicit is None and magic is not None):
            wanted = explicit or magic
            if magic != wanted:
                self._reject(f"it was declared {wanted} but its first bytes are not a {wanted} file")
            self.container = wanted
            return
        if self.options.encryption is not None and self.options.encryption.whole_file:
            self.container = explicit or "txt"  # one Fernet token: ingest decrypts, then reads
            return
        if looks_binary(head):
            self._reject(f"its bytes are not text, and it is none of {SUPPORTED}", code="unsupported_file_type")
        if magic is not None:
            self._reject(f"it is a {magic} file, but ingest_options.container says {explicit}")
        text = decode_text(head).lstrip("\ufeff \t\r\n")
        container = explicit or TEXT_SUFFIXES.get(suffix) or BINARY_SUFFIXES.get(suffix)
        if container is None or container in BINARY_SUFFIXES.values():
            if text.startswith("{"):
                container = "jsonl"
            elif text.startswith("["):
                container = "json"
            elif self.options.format in ("text", "transcript"):
                container = "txt"
            else:
                self._reject("the format cannot be told from its name or its first bytes; name it .jsonl, .json, "
                             ".csv or .txt, or set ingest_options.container", code="unsupported_file_type")
        self.container = container
        if container == "jsonl":
            self._check_first_jsonl_line(head)
        elif container == "json":
            self._check_json_start(text)
        elif container == "csv":
            self._check_csv(text, complete=len(head) < HEAD_BYTES)

    def _check_first_jsonl_line(self, head: bytes) -> None:
        text = decode_text(head)
        for number, line in enumerate(text.split("\n"), start=1):
            stripped = line.strip().lstrip("\ufeff")
            if not stripped:
                continue
            complete = number < len(text.split("\n")) or len(head) < HEAD_BYTES
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
    """Refuse a ZIP whose members escape their folder or whose declared sizes exceed ``max_expanded_bytes``.

    Reads only the central directory (cheap). Declared sizes can lie, so the ingest reader
    still counts bytes while it extracts; this check turns the common bomb and traversal
    into a 400 before anything is stored.
    """
    try:
        archive = zipfile.ZipFile(path)
    # a corrupt central directory also raises these: a version zipfile does not read, a name not in UTF-8
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
        raise InvalidRequest(f"{filename} is not a valid ZIP archive ({exc})", param="file",
                             code="invalid_file_format") from None
    with archive:
        members = archive.infolist()
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
