"""Which text encoding an upload uses, decided before any row is read.

Users bring UTF-8 (often with a BOM from Windows tools), UTF-16 from Excel's
"Unicode text" export, and cp1252/latin-1 from older exports. The rule:

* a byte-order mark decides (UTF-8, UTF-16, UTF-32) and is removed, with a note;
* ``options.encoding`` overrides everything else;
* otherwise the whole file is checked as UTF-8 (one sequential pass, constant memory);
* a file that is not UTF-8 and looks Latin (cp1252/latin-1, the usual Portuguese case)
  is decoded as such with a note naming the encoding; anything else (UTF-16 without
  a BOM, another code page, binary data) is refused with the encoding named, because
  a wrong guess would silently turn every accent into garbage.
"""

from __future__ import annotations

import codecs
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from afina.core.datasets.formats import SNIFF_BYTES, looks_binary
from afina.core.errors import DatasetInvalid, InvalidRequest
from afina.ingest.records import RowIssue

_BOMS: tuple[tuple[bytes, str, str], ...] = (
    # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 (little-endian)"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 (big-endian)"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 (little-endian)"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 (big-endian)"),
)
# Latin text that is not UTF-8 is decoded as Windows-1252: it agrees with latin-1 on every
# Portuguese letter and only adds printable characters (curly quotes, euro sign).
LATIN_CODEC = "cp1252"
_LATIN_FALLBACK_HANDLER = "afina-latin1-fallback"
_SCAN_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class TextEncoding:
    """How to decode one file: the codec, the BOM to skip, notes for the report.

    ``invalid_utf8_at`` is set when a UTF-8 file has a bad byte after valid UTF-8 text
    (a file with a corrupted record): JSONL reports the bad lines one by one, the
    other containers refuse the file naming the line.
    """

    codec: str
    bom_length: int = 0
    notes: tuple[RowIssue, ...] = ()
    invalid_utf8_at: tuple[int, int] | None = None  # (byte offset, 1-based line)
    label: str = "UTF-8"
    errors: str = field(default="strict")

    @property
    def is_utf8(self) -> bool:
        return codecs.lookup(self.codec).name == "utf-8"

    def open_binary(self, path: Path) -> IO[bytes]:
        """The raw bytes after the BOM (for readers that parse UTF-8 bytes directly)."""
        handle = open(path, "rb")  # noqa: SIM115 - the caller closes it
        handle.seek(self.bom_length)
        return handle

    def open_text(self, path: Path, newline: str | None = "") -> io.TextIOWrapper:
        """A text stream after the BOM; ``newline=''`` keeps line endings for csv."""
        if self.errors == _LATIN_FALLBACK_HANDLER:
            _register_latin_fallback()
        return io.TextIOWrapper(self.open_binary(path), encoding=self.codec, errors=self.errors, newline=newline)

    def decode(self, data: bytes) -> str:
        """Decode bytes already in memory (an archive member, a sniffed head)."""
        if self.errors == _LATIN_FALLBACK_HANDLER:
            _register_latin_fallback()
        return data[self.bom_length:].decode(self.codec, self.errors)

    def refuse_if_mixed(self, source: str) -> None:
        """Containers that cannot report a bad byte per row refuse a partly-UTF-8 file up front."""
        if self.invalid_utf8_at is not None:
            offset, line = self.invalid_utf8_at
            raise DatasetInvalid(
                f"{source}: not valid UTF-8 at byte {offset} although the text before it is UTF-8; "
                f"the file mixes encodings. Re-save it as UTF-8, or set 'encoding' if it is all in one other "
                f"encoding", line=line, rule="invalid_encoding", param="file")


def sniff_encoding(path: Path, source: str, override: str | None = None) -> TextEncoding:
    """Decide how to decode ``path``; ``DatasetInvalid`` naming ``source`` when it is not usable text."""
    size = path.stat().st_size
    if size == 0:
        raise DatasetInvalid(f"{source} is empty (0 bytes)", rule="empty_file", param="file")
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    bom = next(((mark, codec, label) for mark, codec, label in _BOMS if head.startswith(mark)), None)
    if override:
        return _overridden(override, bom, source)
    if bom is not None:
        mark, codec, label = bom
        if size == len(mark) or not head[len(mark):].decode(codec, "ignore").strip():
            raise DatasetInvalid(f"{source} is empty (only a byte-order mark)", rule="empty_file", param="file")
        what = "removed the UTF-8 byte-order mark (BOM) at the start of the file" if codec == "utf-8" else \
            f"decoded as {label} from its byte-order mark, which was removed"
        note = RowIssue(source, 0, "file", "bom_removed", "fixed", what)
        return TextEncoding(codec, len(mark), (note,), label=label)
    utf16 = _looks_like_utf16(head)
    if utf16:
        raise DatasetInvalid(
            f"{source}: not UTF-8: looks like UTF-16 ({utf16}) without a byte-order mark; re-save it as UTF-8 "
            f"or set 'encoding': '{'utf-16-le' if utf16 == 'little-endian' else 'utf-16-be'}'",
            rule="invalid_encoding", param="file")
    if looks_binary(head):
        raise DatasetInvalid(
            f"{source} is not a text file: it looks like binary data (control bytes found). Upload JSONL, JSON, "
            f"CSV, Parquet, TXT or a ZIP/tar.gz of those", rule="binary_file", param="file")
    scan = _scan_utf8(path)
    if scan.error_offset is None:
        if not scan.has_content:
            raise DatasetInvalid(f"{source} is empty (only whitespace)", rule="empty_file", param="file")
        return TextEncoding("utf-8")
    if scan.non_ascii_before_error:
        return TextEncoding("utf-8", invalid_utf8_at=(scan.error_offset, scan.error_line))
    return _detected(path, source, head, scan)


def _overridden(override: str, bom: tuple[bytes, str, str] | None, source: str) -> TextEncoding:
    try:
        info = codecs.lookup(override)
        _check_text_codec(info)
    except LookupError:
        raise InvalidRequest(f"unknown encoding {override!r} in the ingest options for {source}; use a name like "
                             f"'utf-8', 'latin-1', 'cp1252' or 'utf-16'", param="encoding") from None
    except (UnicodeError, TypeError, ValueError):
        raise InvalidRequest(f"{override!r} in the ingest options for {source} is not a text encoding a file can be "
                             f"read with; use a name like 'utf-8', 'latin-1', 'cp1252' or 'utf-16'",
                             param="encoding") from None
    if bom is not None and codecs.lookup(bom[1]).name.split("-")[0:2] == info.name.split("-")[0:2]:
        # the BOM names the byte order the override left open ("utf-16" with an LE mark)
        note = RowIssue(source, 0, "file", "bom_removed", "fixed",
                        f"removed the {bom[2]} byte-order mark (BOM) at the start of the file")
        return TextEncoding(bom[1], len(bom[0]), (note,), label=bom[2])
    elif bom is None and info.name in ("utf-16", "utf-32"):
        raise DatasetInvalid(f"{source}: encoding {override!r} needs a byte-order mark; none found. Name the byte "
                             f"order instead ('{info.name}-le' or '{info.name}-be')", rule="invalid_encoding",
                             param="encoding")
    return TextEncoding(info.name, label=info.name)


def _check_text_codec(info: codecs.CodecInfo) -> None:
    """Python's codec registry also holds transforms (``rot13``, ``base64``) and codecs that decode only
    whole strings (``idna``): the readers need a charset that decodes a stream, skipping or refusing bytes."""
    if not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"{info.name} is not a text encoding")
    decoder = codecs.getincrementaldecoder(info.name)(errors="ignore")
    decoder.decode(b"abc\xff", final=True)
    b"abc".decode(info.name, "ignore")


@dataclass
class _Utf8Scan:
    error_offset: int | None = None
    error_line: int = 0
    non_ascii_before_error: bool = False
    has_content: bool = False


def _scan_utf8(path: Path) -> _Utf8Scan:
    """One pass over the file: where the first invalid UTF-8 byte is, if any."""
    scan = _Utf8Scan()
    decoder = codecs.getincrementaldecoder("utf-8")()
    position = 0
    newlines = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_SCAN_CHUNK):
            pending = decoder.getstate()[0]
            if not scan.has_content and chunk.strip():
                scan.has_content = True
            if not pending and chunk.isascii():  # most of most files: nothing to decode
                newlines += chunk.count(b"\n")
                position += len(chunk)
                continue
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                combined = pending + chunk
                scan.error_offset = position - len(pending) + exc.start
                scan.error_line = newlines + combined[:exc.start].count(b"\n") + 1
                scan.non_ascii_before_error = scan.non_ascii_before_error or not combined[:exc.start].isascii()
                return scan
            if not scan.non_ascii_before_error and not chunk.isascii():
                scan.non_ascii_before_error = True
            newlines += chunk.count(b"\n")
            position += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        scan.error_offset = position - len(decoder.getstate()[0])
        scan.error_line = newlines + 1
    return scan


def _detected(path: Path, source: str, head: bytes, scan: _Utf8Scan) -> TextEncoding:
    """Not UTF-8 from its first non-ASCII byte: decode Latin text, refuse anything else naming it."""
    assert scan.error_offset is not None
    with open(path, "rb") as handle:
        handle.seek(max(0, scan.error_offset - 64 * 1024))
        around = handle.read(128 * 1024)
    sample = head if scan.error_offset < len(head) else head[: SNIFF_BYTES // 2] + b"\n" + around
    where = f"first non-UTF-8 byte at line {scan.error_line}"
    if plausibly_latin(sample):
        note = RowIssue(source, 0, "file", "encoding_detected", "fixed",
                        f"not UTF-8 ({where}): latin-1 decoding needed; decoded as Windows-1252/latin-1. Set "
                        f"'encoding' in the ingest options to choose another")
        return TextEncoding(LATIN_CODEC, 0, (note,), label="Windows-1252/latin-1", errors=_LATIN_FALLBACK_HANDLER)
    from charset_normalizer import from_bytes  # heavy import, only to name what a refused file looks like

    matches = list(from_bytes(sample))
    if not matches:
        raise DatasetInvalid(f"{source}: not UTF-8 ({where}) and its encoding could not be recognized; re-save it "
                             f"as UTF-8 or set 'encoding'", rule="invalid_encoding", param="file")
    best = matches[0].encoding
    raise DatasetInvalid(f"{source}: not UTF-8: looks like {best} ({where}); re-save it as UTF-8 or set "
                         f"'encoding': '{best}' in the ingest options", rule="invalid_encoding", param="file")


def plausibly_latin(sample: bytes) -> bool:
    """Decoded as Windows-1252, does the text read like a Latin-script language?

    Statistical detectors are unreliable on short Portuguese samples (they answer cp1250
    or big5 for "ação"), so the common case is checked directly: nearly every non-ASCII
    character is a Latin letter or typographic sign, and accented letters sit inside
    words next to plain letters ("ação"). Cyrillic or Greek read as cp1252 also gives
    letters ("Ïðèâåò"), but whole words of them, so the second test refuses those.
    """
    _register_latin_fallback()
    text = sample.decode(LATIN_CODEC, _LATIN_FALLBACK_HANDLER)
    non_ascii = plausible = letters = next_to_ascii = 0
    for index, char in enumerate(text):
        if char.isascii():
            continue
        non_ascii += 1
        if char in _LATIN_SIGNS:
            plausible += 1
        elif char.isalpha() and char not in "ªº":
            plausible += 1
            letters += 1
            before = text[index - 1] if index else ""
            after = text[index + 1] if index + 1 < len(text) else ""
            if (before.isascii() and before.isalpha()) or (after.isascii() and after.isalpha()):
                next_to_ascii += 1
    if not non_ascii or plausible < 0.9 * non_ascii:
        return False
    return letters == 0 or next_to_ascii >= 0.5 * letters


_LATIN_SIGNS = frozenset("“”‘’‚„–—…•€°ºª§£¢¥©®«»¿¡·´¨\xa0±²³¹½¼¾×÷¶†‡‰™")


def _looks_like_utf16(head: bytes) -> str | None:
    """UTF-16 text without a BOM: ASCII letters leave a zero byte in every other position."""
    sample = head[:4096]
    if len(sample) < 4:
        return None
    even, odd = sample[0::2], sample[1::2]
    even_zeros, odd_zeros = even.count(0) / len(even), odd.count(0) / len(odd)
    if odd_zeros > 0.3 and even_zeros < 0.05:
        return "little-endian"
    if even_zeros > 0.3 and odd_zeros < 0.05:
        return "big-endian"
    return None


_registered = False


def _register_latin_fallback() -> None:
    """cp1252 leaves five bytes undefined; decode those as latin-1 instead of failing."""
    global _registered
    if not _registered:
        codecs.register_error(_LATIN_FALLBACK_HANDLER, _latin1_for_undefined)
        _registered = True


def _latin1_for_undefined(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return error.object[error.start:error.end].decode("latin-1"), error.end
