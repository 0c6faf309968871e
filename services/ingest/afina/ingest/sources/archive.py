"""ZIP and tar(.gz/.bz2/.xz) archives, opened as if they were hostile.

Every member header is checked before a single byte is extracted: names with ``..``,
absolute paths or drive letters, links and devices, encrypted members, more than
``MAX_ARCHIVE_MEMBERS`` files, declared sizes over the caps, and compression ratios
only a decompression bomb reaches all refuse the whole archive, naming the member.
Extraction then counts the bytes it actually writes, one member at a time into a
temporary file that is deleted before the next, so a lying header cannot fill the disk.

Each member is read through the same readers as a plain upload (its rows are named
``data.zip:folder/a.jsonl``); a member that cannot be read becomes an error row and the
other members go on. An archive with ``inputs/`` and ``outputs/`` folders (``format:
paired``, or auto-detected) yields each member's whole text for the paired converter.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from afina.core.datasets import formats as limits
from afina.core.datasets.formats import ARCHIVE_SUFFIXES
from afina.core.datasets.options import IngestOptions, PairedOptions
from afina.core.errors import DatasetInvalid
from afina.ingest.records import RowIssue, SourceRow
from afina.ingest.sources.encoding import sniff_encoding
from afina.ingest.sources.text import read_text

# the paired converter's view of a member: its path inside the archive and its text
PAIRED_MEMBER_KEY = "__member__"
PAIRED_TEXT_KEY = "__text__"

NESTED_ARCHIVE = "archives inside archives are not read; extract it and add its files to the outer archive"

ReadFile = Callable[[Path, str, str], Iterator[SourceRow]]  # (path, source name, member file name) -> rows

_JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
_DRIVE = re.compile(r"^[A-Za-z]:")
_COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Member:
    name: str  # normalized path inside the archive ("folder/a.jsonl")
    size: int  # declared uncompressed size
    handle: object  # the ZipInfo or TarInfo to extract it


def read_archive(path: Path, filename: str, kind: str, options: IngestOptions,
                 read_file: ReadFile) -> Iterator[SourceRow]:
    """Rows of every member of a ZIP (``kind="zip"``) or tar archive, after the safety checks."""
    opener = _ZipArchive(path, filename) if kind == "zip" else _TarArchive(path, filename)
    with opener as archive, tempfile.TemporaryDirectory(prefix="afina-archive-") as tmp:
        members = [member for member in archive.members if not _is_junk(member.name)]
        if not members:
            raise DatasetInvalid(f"{filename} holds no files", rule="empty_file", param="file")
        paired = options.paired or PairedOptions()
        root = paired_root([member.name for member in members], paired)
        if options.format == "paired" and root is None:
            tops = sorted({member.name.split("/", 1)[0] for member in members})[:10]
            raise DatasetInvalid(f"{filename}: format 'paired' needs folders '{paired.inputs_dir}/' and "
                                 f"'{paired.outputs_dir}/' in the archive; found {tops}", rule="paired_layout",
                                 param="file")
        use_paired = root is not None and options.format in ("auto", "paired")
        budget = _Budget()
        for index, member in enumerate(members):
            source = f"{filename}:{member.name}"
            if use_paired:
                assert root is not None
                relative = _under_paired_folder(member.name, root, paired)
                if relative is None:
                    yield SourceRow(source, 0, None, RowIssue(
                        source, 0, "file", "paired_unexpected_file", "dropped",
                        f"not inside '{paired.inputs_dir}/' or '{paired.outputs_dir}/'; ignored"))
                    continue
            if member.name.lower().endswith(ARCHIVE_SUFFIXES):
                yield _member_error(source, "nested_archive", NESTED_ARCHIVE)
                continue
            target = Path(tmp) / f"member-{index}"
            archive.extract(member, target, budget)
            try:
                if use_paired:
                    text = read_text(target, source, sniff_encoding(target, source, options.encoding))
                    yield SourceRow(source, 1, {PAIRED_MEMBER_KEY: relative, PAIRED_TEXT_KEY: text})
                else:  # an archive under another name is refused by ``read_file`` (``nested_archive``)
                    yield from read_file(target, source, member.name.rsplit("/", 1)[-1])
            except DatasetInvalid as exc:
                yield _member_error(source, exc.rule or "invalid_file", exc.message, exc.line or 0)
            finally:
                target.unlink(missing_ok=True)


def decompress_single(path: Path, dest: Path, source: str, compression: str) -> None:
    """A single compressed file (``compression``: a ``compressed`` container's name), decompressed with the
    archive caps."""
    opener = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}[compression]
    try:
        with opener(path, "rb") as compressed:
            _copy_capped(compressed, dest, source, limits.MAX_ARCHIVE_MEMBER_BYTES, path.stat().st_size, _Budget())
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DatasetInvalid(f"{source} could not be decompressed: {exc}", rule="invalid_archive",
                             param="file") from None


def paired_root(names: list[str], paired: PairedOptions) -> str | None:
    """The folder holding ``inputs/`` and ``outputs/`` ("" or one top folder), if the layout is there."""
    tops = {name.split("/", 1)[0] + "/" for name in names if "/" in name}
    for root in ["", *sorted(tops)]:
        has_inputs = any(name.startswith(f"{root}{paired.inputs_dir}/") for name in names)
        has_outputs = any(name.startswith(f"{root}{paired.outputs_dir}/") for name in names)
        if has_inputs and has_outputs:
            return root
    return None


def safe_member_name(raw: str, archive: str) -> str:
    """The member's normalized path; ``DatasetInvalid`` for a path that could escape the extraction folder."""
    name = raw.replace("\\", "/")
    parts = name.split("/")
    if name.startswith("/") or _DRIVE.match(name) or ".." in parts or "\x00" in name:
        raise DatasetInvalid(f"{archive}: unsafe archive member {raw!r} (absolute path or '..', path traversal); "
                             f"the archive was refused", rule="unsafe_archive", param="file")
    return "/".join(part for part in parts if part not in ("", "."))


class _Budget:
    """Bytes actually written across all members of one archive."""

    def __init__(self) -> None:
        self.total = 0


def _copy_capped(src: IO[bytes], dest: Path, source: str, declared: int, compressed: int, budget: _Budget) -> None:
    written = 0
    with open(dest, "wb") as out:
        while chunk := src.read(_COPY_CHUNK):
            written += len(chunk)
            budget.total += len(chunk)
            if written > declared or written > limits.MAX_ARCHIVE_MEMBER_BYTES \
                    or budget.total > limits.MAX_ARCHIVE_TOTAL_BYTES or _bomb_ratio(written, compressed):
                raise DatasetInvalid(f"{source} expands beyond its declared size or the archive limits "
                                     f"(decompression bomb?); the archive was refused", rule="archive_too_large",
                                     param="file")
            out.write(chunk)


def _bomb_ratio(uncompressed: int, compressed: int) -> bool:
    return uncompressed > limits.RATIO_CHECK_MIN_BYTES and uncompressed > compressed * limits.MAX_COMPRESSION_RATIO


def _check_sizes(archive: str, name: str, size: int, compressed: int, total: int, archive_bytes: int) -> None:
    where = f"{archive}: member {name!r}"
    if size > limits.MAX_ARCHIVE_MEMBER_BYTES:
        raise DatasetInvalid(f"{where} expands to {size / limits.GiB:.1f} GiB, over the "
                             f"{limits.MAX_ARCHIVE_MEMBER_BYTES / limits.GiB:.0f} GiB per-file limit; the archive was "
                             f"refused", rule="archive_too_large", param="file")
    if _bomb_ratio(size, compressed):
        raise DatasetInvalid(f"{where} expands {size / max(compressed, 1):.0f}x ({size / limits.MiB:.0f} MiB from "
                             f"{compressed / limits.MiB:.1f} MiB), over the {limits.MAX_COMPRESSION_RATIO}x "
                             f"compression-ratio limit (decompression bomb); the archive was refused",
                             rule="archive_bomb", param="file")
    if total > limits.MAX_ARCHIVE_TOTAL_BYTES:
        raise DatasetInvalid(f"{archive} expands to more than {limits.MAX_ARCHIVE_TOTAL_BYTES / limits.GiB:.0f} GiB "
                             f"(at member {name!r}); the archive was refused", rule="archive_too_large", param="file")
    if _bomb_ratio(total, archive_bytes):
        raise DatasetInvalid(f"{archive} expands {total / max(archive_bytes, 1):.0f}x (at member {name!r}), over the "
                             f"{limits.MAX_COMPRESSION_RATIO}x compression-ratio limit (decompression bomb); the "
                             f"archive was refused", rule="archive_bomb", param="file")


def _check_count(archive: str, count: int) -> None:
    if count > limits.MAX_ARCHIVE_MEMBERS:
        raise DatasetInvalid(f"{archive} holds more than {limits.MAX_ARCHIVE_MEMBERS} entries; the archive was "
                             f"refused", rule="archive_too_many_files", param="file")


class _ZipArchive:
    def __init__(self, path: Path, filename: str) -> None:
        self.path, self.filename = path, filename
        self.members: list[Member] = []

    def __enter__(self) -> _ZipArchive:
        try:
            self.zip = zipfile.ZipFile(self.path)
        # NotImplementedError: a header's version is past what zipfile reads; ValueError: a name that is not
        # UTF-8 although flagged so, an offset out of the file
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
            raise DatasetInvalid(f"{self.filename} is not a readable ZIP archive: {exc}", rule="invalid_archive",
                                 param="file") from None
        try:
            self._check()
        except BaseException:
            self.zip.close()
            raise
        return self

    def _check(self) -> None:
        infos = self.zip.infolist()
        _check_count(self.filename, len(infos))
        archive_bytes, total = self.path.stat().st_size, 0
        for info in infos:
            name = safe_member_name(info.filename, self.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetInvalid(f"{self.filename}: member {info.filename!r} is a symbolic link; links are "
                                     f"refused", rule="unsafe_archive", param="file")
            if info.flag_bits & 0x1:
                raise DatasetInvalid(f"{self.filename}: member {info.filename!r} is password-protected; upload an "
                                     f"unencrypted archive (use 'encryption' for Fernet data)",
                                     rule="encrypted_archive", param="file")
            if info.is_dir() or not name:
                continue
            total += info.file_size
            _check_sizes(self.filename, name, info.file_size, info.compress_size, total, archive_bytes)
            self.members.append(Member(name, info.file_size, info))

    def extract(self, member: Member, target: Path, budget: _Budget) -> None:
        source = f"{self.filename}:{member.name}"
        try:
            with self.zip.open(member.handle) as src:  # type: ignore[call-overload]
                _copy_capped(src, target, source, member.size, member.handle.compress_size, budget)  # type: ignore[attr-defined]
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, ValueError) as exc:
            raise DatasetInvalid(f"{source} could not be extracted (corrupt archive member): {exc}",
                                 rule="invalid_archive", param="file") from None

    def __exit__(self, *exc: object) -> None:
        self.zip.close()


class _TarArchive:
    def __init__(self, path: Path, filename: str) -> None:
        self.path, self.filename = path, filename
        self.members: list[Member] = []

    def __enter__(self) -> _TarArchive:
        try:
            self.tar = tarfile.open(self.path, "r:*")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DatasetInvalid(f"{self.filename} is not a readable tar archive: {exc}", rule="invalid_archive",
                                 param="file") from None
        try:
            self._check()
        except BaseException:
            self.tar.close()
            raise
        return self

    def _check(self) -> None:
        """Header by header: reaching the next header decompresses this member's data, so check first."""
        archive_bytes, total, count = self.path.stat().st_size, 0, 0
        while True:
            try:
                info = self.tar.next()
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                raise DatasetInvalid(f"{self.filename}: corrupt tar archive after {count} entries: {exc}",
                                     rule="invalid_archive", param="file") from None
            if info is None:
                return
            count += 1
            _check_count(self.filename, count)
            name = safe_member_name(info.name, self.filename)
            if info.isdir() or not name:
                continue
            if not info.isreg():
                kind = "a link" if info.issym() or info.islnk() else "a device or special file"
                raise DatasetInvalid(f"{self.filename}: member {info.name!r} is {kind}; only regular files are "
                                     f"accepted", rule="unsafe_archive", param="file")
            total += info.size
            _check_sizes(self.filename, name, info.size, archive_bytes, total, archive_bytes)
            self.members.append(Member(name, info.size, info))

    def extract(self, member: Member, target: Path, budget: _Budget) -> None:
        source = f"{self.filename}:{member.name}"
        try:
            src = self.tar.extractfile(member.handle)  # type: ignore[arg-type]
            assert src is not None
            with src:
                _copy_capped(src, target, source, member.size, self.path.stat().st_size, budget)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DatasetInvalid(f"{source} could not be extracted (corrupt archive member): {exc}",
                                 rule="invalid_archive", param="file") from None

    def __exit__(self, *exc: object) -> None:
        self.tar.close()


def _is_junk(name: str) -> bool:
    """Files archivers add on their own (macOS resource forks, Finder and Explorer metadata, dotfiles)."""
    parts = name.split("/")
    return parts[0] == "__MACOSX" or parts[-1].lower() in _JUNK_NAMES or any(part.startswith(".") for part in parts)


def _under_paired_folder(name: str, root: str, paired: PairedOptions) -> str | None:
    for folder in (paired.inputs_dir, paired.outputs_dir):
        prefix = f"{root}{folder}/"
        if name.startswith(prefix):
            return name[len(root):]
    return None


def _member_error(source: str, rule: str, detail: str, line: int = 0) -> SourceRow:
    return SourceRow(source, line, None, RowIssue(source, line, "file", rule, "error", detail))
