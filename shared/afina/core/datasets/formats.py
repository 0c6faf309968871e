"""The one table of dataset containers and record formats, and the limits they share.

The gateway's upload sniff (``afina.core.datasets.sniff``) and the ingest readers
(``afina.ingest.sources``) both decide a file's container here, from the same bytes (the
first ``SNIFF_BYTES``) and the same name, so an upload the gateway accepts as a ``.jsonl.gz``
is the single gzip file ingest decompresses, and a line the gateway lets through is a line
ingest reads. Adding a container is one ``ContainerSpec`` in ``CONTAINERS`` (and its reader in
``afina.ingest.sources``); adding a record format is one ``RecordFormatSpec`` in
``RECORD_FORMATS`` (the schema half the gateway validates: its name and options section) and
one entry of ``afina.ingest.formats.registry`` (the behaviour half: detector and converter);
``tests/unit/ingest/test_format_registry.py`` checks that the halves, the ``DatasetFormat`` and
``ContainerFormat`` schema names and the two sides' decisions agree.

Rules, in the order ``detect_container`` applies them:

1. a declared container (``ingest_options.container``) is taken as declared;
2. magic bytes decide binary containers, whatever the name: ZIP, Parquet, tar, and the
   compressed streams (gzip, bzip2, xz). A compressed stream is a tar when its decompressed
   head shows a tar header or its name says tar (``.tar.gz``, ``.tgz``, ``.tar.bz2``...), else
   a single compressed file read under its name without the suffix (``data.jsonl.gz``);
3. an encrypted name (``.enc``, ``.fernet``, ``.encrypted``) is a whole-file Fernet token;
4. text: ``.csv``/``.tsv`` and ``.txt``/``.md``/``.log``/``.text`` by name; JSON by its first
   bytes (``[`` an array, ``{`` JSON Lines when the first line is a whole object, or under a
   ``.jsonl`` name) and otherwise by name; a name and a head that say nothing decide nothing
   (None): the upload sniff refuses such a file unless the format reads whole text, ingest
   reads an archive member like that as text.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

import orjson

MiB = 1024 * 1024
GiB = 1024 * MiB

# One JSONL line or CSV physical line (bytes, without the newline). Past it a record is a mistake (a whole
# dataset on one line, a binary blob): ingest never reads such a line (a row error, the rest goes on), and in
# ``mode: strict``, where that row error fails the file, the upload sniff refuses the upload at once.
MAX_LINE_BYTES = 16 * MiB
# How much of a file the container and encoding sniffers look at, on both sides (a bzip2 block, the largest
# unit a compressed head must hold before it says what is inside, is under 1 MiB).
SNIFF_BYTES = 1 * MiB
# Archives: checked against the declared sizes before anything is extracted (the upload sniff reads a ZIP's
# central directory; ingest every header), and again while bytes are actually decompressed.
MAX_ARCHIVE_MEMBERS = 10_000
MAX_ARCHIVE_TOTAL_BYTES = 4 * GiB
MAX_ARCHIVE_MEMBER_BYTES = 2 * GiB
# Text compresses 5-20x; 200x is only reached by padding, repetition or a bomb.
MAX_COMPRESSION_RATIO = 200
# The ratio cap applies only past this size: a tiny, very repetitive member is harmless.
RATIO_CHECK_MIN_BYTES = 16 * MiB

ContainerName = Literal["jsonl", "json", "csv", "txt", "parquet", "zip", "tar", "gzip", "bzip2", "xz", "fernet"]
ContainerKind = Literal["text", "columnar", "archive", "compressed", "encrypted"]

TAR_MAGIC_OFFSET = 257
_TAR_MAGIC = b"ustar"
# UTF-32 first: its little-endian mark starts with UTF-16's
_UNICODE_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
                 (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
UTF8_BOM = b"\xef\xbb\xbf"
# C0 control bytes that never appear in text files (tab, LF, FF, CR and ESC excluded), and DEL
_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27)) + b"\x7f"
_BINARY_SAMPLE_BYTES = 64 * 1024


@dataclass(frozen=True)
class ContainerSpec:
    """One container: how it is named, how its bytes start, and what kind of reading it needs.

    ``line_based``: read one physical line at a time, so ``MAX_LINE_BYTES`` applies (JSONL, CSV).
    ``sniffed``: the name alone does not decide (``.json`` may hold JSON Lines); the head does.
    ``declarable``: may be named in ``ingest_options.container``.
    """

    name: ContainerName
    kind: ContainerKind
    suffixes: tuple[str, ...]
    magics: tuple[bytes, ...] = ()
    magic_offset: int = 0
    line_based: bool = False
    sniffed: bool = False
    declarable: bool = False

    def has_magic(self, head: bytes) -> bool:
        return any(head[self.magic_offset:self.magic_offset + len(magic)] == magic for magic in self.magics)

    def named(self, filename: str) -> bool:
        return filename.lower().endswith(self.suffixes)

    def inner_name(self, filename: str) -> str:
        """``data.jsonl.gz`` -> ``data.jsonl``: the name a decompressed or decrypted file is read under."""
        lower = filename.lower()
        for suffix in sorted(self.suffixes, key=len, reverse=True):
            if lower.endswith(suffix):
                return filename[: -len(suffix)]
        return filename


CONTAINERS: tuple[ContainerSpec, ...] = (
    ContainerSpec("jsonl", "text", (".jsonl", ".ndjson", ".jsonlines"), line_based=True, sniffed=True,
                  declarable=True),
    ContainerSpec("json", "text", (".json",), sniffed=True, declarable=True),
    ContainerSpec("csv", "text", (".csv", ".tsv"), line_based=True, declarable=True),
    ContainerSpec("txt", "text", (".txt", ".text", ".md", ".log"), declarable=True),
    ContainerSpec("parquet", "columnar", (".parquet", ".pq"), magics=(b"PAR1",), declarable=True),
    ContainerSpec("zip", "archive", (".zip",), magics=(b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"),
                  declarable=True),
    # a tar's own magic; a compressed tar starts with its compressor's magic (see ``detect_container``)
    ContainerSpec("tar", "archive", (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz"),
                  magics=(_TAR_MAGIC,), magic_offset=TAR_MAGIC_OFFSET, declarable=True),
    ContainerSpec("gzip", "compressed", (".gz",), magics=(b"\x1f\x8b",)),
    ContainerSpec("bzip2", "compressed", (".bz2",), magics=(b"BZh",)),
    ContainerSpec("xz", "compressed", (".xz",), magics=(b"\xfd7zXZ\x00",)),
    # one Fernet token (read with ``encryption.whole_file``); told by name only: its base64 could be any text
    ContainerSpec("fernet", "encrypted", (".enc", ".fernet", ".encrypted")),
)
CONTAINERS_BY_NAME: dict[str, ContainerSpec] = {spec.name: spec for spec in CONTAINERS}
ARCHIVE_SUFFIXES: tuple[str, ...] = tuple(suffix for spec in CONTAINERS if spec.kind == "archive"
                                          for suffix in spec.suffixes)
SUPPORTED = "JSONL, JSON, CSV/TSV, TXT, Parquet, ZIP or tar, each optionally gzip/bzip2/xz-compressed"


def container(name: str) -> ContainerSpec:
    return CONTAINERS_BY_NAME[name]


def detect_container(head: bytes, filename: str, declared: str = "auto") -> ContainerSpec | None:
    """The container of a file whose first ``SNIFF_BYTES`` are ``head``; None when nothing tells.

    The one decision both the upload sniff and ingest make (the module docstring lists the rules).
    """
    if declared != "auto":
        return CONTAINERS_BY_NAME[declared]
    by_magic = container_from_magic(head, filename)
    if by_magic is not None:
        return by_magic
    if CONTAINERS_BY_NAME["fernet"].named(filename):
        return CONTAINERS_BY_NAME["fernet"]
    return text_container(head, filename)


def container_from_magic(head: bytes, filename: str) -> ContainerSpec | None:
    """A binary container told by its first bytes (a compressed stream by what it holds, see the rules)."""
    for spec in CONTAINERS:
        if spec.magics and spec.has_magic(head):
            if spec.kind == "compressed" and _holds_tar(spec, head, filename):
                return CONTAINERS_BY_NAME["tar"]
            return spec
    return None


def text_container(head: bytes, filename: str) -> ContainerSpec | None:
    """``jsonl``/``json``/``csv``/``txt`` for a file known to be text; None when neither name nor head tells."""
    by_name = next((spec for spec in CONTAINERS if spec.kind == "text" and _last_suffix(filename) in spec.suffixes),
                   None)
    if by_name is not None and not by_name.sniffed:
        return by_name
    text = decode_text(head).lstrip("\ufeff \t\r\n")
    if text.startswith("["):
        return CONTAINERS_BY_NAME["json"]
    if text.startswith("{"):
        if by_name is not None and by_name.name == "jsonl":
            # a damaged first line stays a JSONL row error instead of turning the file into one broken document
            return by_name
        try:
            orjson.loads(text.split("\n", 1)[0])
        except orjson.JSONDecodeError:
            return CONTAINERS_BY_NAME["json"]  # an object spread over lines: one JSON document
        return CONTAINERS_BY_NAME["jsonl"]
    return by_name


def decode_text(data: bytes) -> str:
    """Text for a look at the head: UTF-8 (BOM stripped), UTF-16/32 by BOM, else latin-1 (never fails)."""
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    for bom, codec in _UNICODE_BOMS:
        if data.startswith(bom):
            width = 4 if "32" in codec else 2
            return data[len(bom): len(data) - (len(data) - len(bom)) % width].decode(codec, "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= len(data) - 3:  # a multi-byte character cut by the head's end
            return data[: exc.start].decode("utf-8")
        return data.decode("latin-1")


def looks_binary(head: bytes) -> bool:
    """NUL bytes or many control characters: not text in any encoding ingest decodes (UTF-16/32 have a BOM)."""
    if head.startswith(tuple(bom for bom, _ in _UNICODE_BOMS)):
        return False
    sample = head[:_BINARY_SAMPLE_BYTES]
    if b"\x00" in sample:
        return True
    controls = sum(sample.count(byte) for byte in _CONTROL_BYTES)
    return controls > max(2, len(sample) // 100)


def _holds_tar(spec: ContainerSpec, head: bytes, filename: str) -> bool:
    """A compressed stream is a tar when its first decompressed bytes show a tar header, or its name says tar.

    The name is the tiebreaker for what the head cannot show: an old tar without the ``ustar`` magic, or a head
    cut before the first header decompresses.
    """
    wanted = TAR_MAGIC_OFFSET + len(_TAR_MAGIC)
    try:
        if spec.name == "gzip":
            inner = zlib.decompressobj(wbits=31).decompress(head, wanted)
        elif spec.name == "bzip2":
            inner = bz2.BZ2Decompressor().decompress(head, wanted)
        else:
            inner = lzma.LZMADecompressor().decompress(head, wanted)
    except (zlib.error, OSError, EOFError, lzma.LZMAError):
        inner = b""
    if inner[TAR_MAGIC_OFFSET:wanted] == _TAR_MAGIC:
        return True
    return CONTAINERS_BY_NAME["tar"].named(filename)


def _last_suffix(filename: str) -> str:
    return PurePosixPath(filename.lower()).suffix


# record formats ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordFormatSpec:
    """One record format, as the API knows it: its ``ingest_options.format`` name and its options section.

    ``options_section`` names the ``IngestOptions`` field that configures it; ``section_required`` refuses the
    format without it (a column mapping cannot be guessed). ``whole_text``: it reads a TXT file's whole text,
    so a text upload whose container nothing else tells is read as TXT for it. ``archive_only``: its records
    are the members of an archive. Its detector and converter are ``afina.ingest.formats.registry``'s.
    """

    name: str
    summary: str
    options_section: str | None = None
    section_required: bool = False
    whole_text: bool = False
    archive_only: bool = False


RECORD_FORMATS: tuple[RecordFormatSpec, ...] = (
    RecordFormatSpec("paired", "an archive of input files and expected-output files, paired by base name",
                     options_section="paired", archive_only=True),
    RecordFormatSpec("columns", "a mapping of user and assistant templates over the columns",
                     options_section="columns", section_required=True),
    RecordFormatSpec("openai", "'messages' (OpenAI chat)"),
    RecordFormatSpec("sharegpt", "'conversations' (ShareGPT)"),
    RecordFormatSpec("alpaca", "'instruction' + 'output' (Alpaca)"),
    RecordFormatSpec("prompt_completion", "'prompt' + 'completion'"),
    RecordFormatSpec("transcript", "a chat log with speaker prefixes", options_section="transcript",
                     whole_text=True),
    RecordFormatSpec("text", "'text' (or plain text: continued pretraining)", whole_text=True),
)
RECORD_FORMATS_BY_NAME: dict[str, RecordFormatSpec] = {spec.name: spec for spec in RECORD_FORMATS}
WHOLE_TEXT_FORMATS = frozenset(spec.name for spec in RECORD_FORMATS if spec.whole_text)
