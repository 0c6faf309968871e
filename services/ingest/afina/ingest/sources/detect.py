"""Which container a file is, from its magic bytes first and its name second.

Magic bytes win for binary containers (a ``.jsonl`` that starts with ``PK`` is a ZIP).
For text, the name decides, except that ``.json``/``.jsonl`` and unknown names are
sniffed: a document starting with ``[`` is a JSON array, one whose first line is a
complete object is JSON Lines (seed 004's ``trn.json`` is JSONL under a ``.json`` name).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Literal

import orjson

from afina.ingest.sources.encoding import TextEncoding
from afina.ingest.sources.limits import SNIFF_BYTES

BinaryContainer = Literal["zip", "tar", "parquet", "gzip"]
TextContainer = Literal["jsonl", "json", "csv", "txt"]

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
PARQUET_MAGIC = b"PAR1"
COMPRESSED_MAGICS = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
TAR_MAGIC_OFFSET = 257

TEXT_EXTENSIONS: dict[str, TextContainer] = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonlines": "jsonl",
    ".csv": "csv", ".tsv": "csv",
    ".txt": "txt", ".log": "txt", ".md": "txt", ".text": "txt",
}
SNIFFED_EXTENSIONS = frozenset({".json", ".jsonl", ".ndjson"})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ENCRYPTED_SUFFIXES = (".enc", ".fernet", ".encrypted")


def binary_container(path: Path, declared: str = "auto") -> BinaryContainer | None:
    """``zip``/``tar``/``parquet``/``gzip`` (a single compressed file) from magic bytes; None for text."""
    if declared in ("zip", "tar", "parquet"):
        return declared  # type: ignore[return-value]
    if declared != "auto":
        return None
    with open(path, "rb") as handle:
        head = handle.read(TAR_MAGIC_OFFSET + 8)
    if head.startswith(ZIP_MAGICS):
        return "zip"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head[TAR_MAGIC_OFFSET:TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    if head.startswith(COMPRESSED_MAGICS):
        return "tar" if _is_tar(path) else "gzip"
    return None


def text_container(path: Path, filename: str, encoding: TextEncoding, declared: str = "auto") -> TextContainer:
    """``jsonl``/``json``/``csv``/``txt`` for a file known to be text."""
    if declared in ("jsonl", "json", "csv", "txt"):
        return declared  # type: ignore[return-value]
    suffix = Path(filename.lower()).suffix
    if suffix in TEXT_EXTENSIONS and suffix not in SNIFFED_EXTENSIONS:
        return TEXT_EXTENSIONS[suffix]
    with open(path, "rb") as handle:
        # only looked at, never kept: a character cut at the end of the sample is ignored
        head = handle.read(SNIFF_BYTES)[encoding.bom_length:].decode(encoding.codec, "ignore")
    sniffed = _sniff_json(head, trust_lines=suffix in (".jsonl", ".ndjson"))
    return sniffed or ("jsonl" if suffix in SNIFFED_EXTENSIONS else "txt")


def _sniff_json(head: str, trust_lines: bool) -> TextContainer | None:
    """``[`` opens a JSON array; ``{`` opens JSON Lines when the first line is a whole object.

    With ``trust_lines`` (a ``.jsonl`` name) a damaged first line stays a JSONL row error
    instead of turning the file into one broken JSON document.
    """
    stripped = head.lstrip()
    if stripped.startswith("["):
        return "json"
    if stripped.startswith("{"):
        if trust_lines:
            return "jsonl"
        first_line = stripped.split("\n", 1)[0]
        try:
            orjson.loads(first_line)
        except orjson.JSONDecodeError:
            return "json"  # an object spread over lines: one JSON document
        return "jsonl"
    return None


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, tarfile.TarError):
        return False


def strip_suffix(filename: str, suffixes: tuple[str, ...]) -> str:
    """``data.jsonl.gz`` -> ``data.jsonl``: the name a decompressed/decrypted file is read under."""
    lower = filename.lower()
    for suffix in suffixes:
        if lower.endswith(suffix):
            return filename[: -len(suffix)]
    return filename
