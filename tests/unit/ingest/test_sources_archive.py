"""ZIP and tar.gz uploads: members read through the same readers, hostile archives refused up front."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from afina.core.datasets import formats as limits
from afina.core.datasets.options import IngestOptions
from afina.core.errors import DatasetInvalid
from afina.ingest.records import SourceRow
from afina.ingest.sources import PAIRED_MEMBER_KEY, PAIRED_TEXT_KEY, open_rows

GiB = 1024 ** 3


def read(path: Path, **options: Any) -> list[SourceRow]:
    return list(open_rows(path, path.name, IngestOptions(**options)))


def jsonl(*records: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(record) + b"\n" for record in records)


def chat(user: str, assistant: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return path


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the readers put extracted members, to check nothing was written."""
    folder = tmp_path / "extract"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def written_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# --- reading members ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_every_member_is_read_through_the_same_readers(tmp_path: Path, kind: str) -> None:
    members = {
        "dados/conversas.jsonl": jsonl(chat("Oi", "Olá!"), chat("Qual seu nome?", "Sou o Aeon.")),
        "dados/produtos.csv": "title;content\nCaneca;Caneca de cerâmica 300 ml\n".encode(),
        "__MACOSX/dados/._conversas.jsonl": b"\x00\x05\x16\x07junk",
        "dados/.DS_Store": b"\x00\x00\x00\x01Bud1",
    }
    path = tmp_path / f"pacote.{kind}"
    make_zip(path, members) if kind == "zip" else make_tar(path, members)
    rows = read(path)
    assert [(row.source, row.line) for row in rows] == [
        (f"pacote.{kind}:dados/conversas.jsonl", 1), (f"pacote.{kind}:dados/conversas.jsonl", 2),
        (f"pacote.{kind}:dados/produtos.csv", 2),
    ]
    assert rows[2].value == {"title": "Caneca", "content": "Caneca de cerâmica 300 ml"}


def test_a_bad_member_is_a_row_error_and_the_others_are_read(tmp_path: Path) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as nested:
        nested.writestr("x.jsonl", jsonl(chat("a", "b")))
    path = make_zip(tmp_path / "misto.zip", {
        "vazio.jsonl": b"",
        "binario.csv": bytes(range(256)) * 8,
        "interno.zip": inner.getvalue(),
        "bom.jsonl": jsonl(chat("Bom dia", "Bom dia! Como posso ajudar?")),
    })
    rows = read(path)
    errors = [(row.source, row.issue.rule) for row in rows if row.issue is not None]
    assert errors == [("misto.zip:vazio.jsonl", "empty_file"), ("misto.zip:binario.csv", "binary_file"),
                      ("misto.zip:interno.zip", "nested_archive")]
    assert all(row.issue.action == "error" for row in rows if row.issue is not None)
    assert "misto.zip:vazio.jsonl is empty" in rows[0].issue.detail
    assert [row.value for row in rows if row.value is not None] == [chat("Bom dia", "Bom dia! Como posso ajudar?")]


def test_a_gzipped_single_file_is_decompressed(tmp_path: Path) -> None:
    path = tmp_path / "conversas.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(chat("Oi", "Olá"), chat("Tchau", "Até mais"))))
    rows = read(path)
    assert [(row.source, row.line) for row in rows] == [("conversas.jsonl.gz", 1), ("conversas.jsonl.gz", 2)]


def test_paired_folders_are_detected_and_read_as_whole_texts(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "pastas.zip", {
        "projeto/inputs/contrato_01.txt": b"Resuma o contrato de aluguel.",
        "projeto/outputs/contrato_01.json": b'{"resumo": "Aluguel de 12 meses."}',
    })
    rows = read(path)
    assert [row.value for row in rows] == [
        {PAIRED_MEMBER_KEY: "inputs/contrato_01.txt", PAIRED_TEXT_KEY: "Resuma o contrato de aluguel."},
        {PAIRED_MEMBER_KEY: "outputs/contrato_01.json", PAIRED_TEXT_KEY: '{"resumo": "Aluguel de 12 meses."}'},
    ]


def test_format_paired_without_the_folders_is_refused(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "sem_pastas.zip", {"a.txt": b"x", "b.txt": b"y"})
    with pytest.raises(DatasetInvalid, match="sem_pastas.zip: format 'paired' needs folders 'inputs/' and 'outputs/'"):
        read(path, format="paired")


# --- hostile archives --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../fora.jsonl", "dados/../../fora.jsonl", "/etc/cron.d/afina", "..\\fora.jsonl",
                                  "C:/Windows/fora.jsonl"])
def test_a_zip_member_escaping_the_folder_is_refused(tmp_path: Path, private_tmp: Path, name: str) -> None:
    path = make_zip(tmp_path / "traversal.zip", {"ok.jsonl": jsonl(chat("a", "b")), name: jsonl(chat("c", "d"))})
    with pytest.raises(DatasetInvalid, match="traversal.zip: unsafe archive member .*path traversal") as caught:
        read(path)
    assert repr(name) in caught.value.message
    assert written_bytes(private_tmp) == 0


def test_a_tar_member_escaping_the_folder_or_linking_out_is_refused(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "traversal.tar.gz", {"ok.jsonl": jsonl(chat("a", "b")), "../fora.jsonl": b"{}"})
    with pytest.raises(DatasetInvalid, match="unsafe archive member '../fora.jsonl'"):
        read(path)
    linked = tmp_path / "link.tar.gz"
    with tarfile.open(linked, "w:gz") as archive:
        info = tarfile.TarInfo("senhas.jsonl")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
        archive.addfile(info)
    with pytest.raises(DatasetInvalid, match="member 'senhas.jsonl' is a link"):
        read(linked)


def test_a_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "symlink.zip"
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("atalho.jsonl")
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(DatasetInvalid, match="'atalho.jsonl' is a symbolic link"):
        read(path)


def _zip_bomb(path: Path, name: str, size: int) -> None:
    """A real deflate stream of ``size`` zero bytes (~1000x), written without compressing it all:
    after a full flush the compressor forgets its history, so each 1 MiB block compresses the same."""
    block = bytes(1024 * 1024)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    data = first + repeat * (size // len(block) - 1) + compressor.flush()
    crc = 0  # never reached: the archive must be refused before any byte is inflated
    encoded = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(encoded), 0)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size, len(encoded),
                          0, 0, 0, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(local + encoded + data)
        offset = handle.tell()
        handle.write(central + encoded)
        handle.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central) + len(encoded), offset, 0))


def test_a_zip_that_expands_to_gigabytes_is_refused_quickly_without_writing(tmp_path: Path, private_tmp: Path) -> None:
    path = tmp_path / "bomba.zip"
    _zip_bomb(path, "dados.jsonl", 3 * GiB)
    assert path.stat().st_size < 8 * 1024 * 1024
    with zipfile.ZipFile(path) as archive:  # a genuine archive: the member inflates to 3 GiB of zeros
        assert archive.getinfo("dados.jsonl").file_size == 3 * GiB
        with archive.open("dados.jsonl") as member:
            assert member.read(4 * 1024 * 1024) == bytes(4 * 1024 * 1024)
    started = time.monotonic()
    with pytest.raises(DatasetInvalid, match=r"bomba.zip: member 'dados.jsonl' expands to 3.0 GiB") as caught:
        read(path)
    assert time.monotonic() - started < 1
    assert caught.value.rule == "archive_too_large"
    assert written_bytes(private_tmp) == 0


def test_a_zip_bomb_under_the_size_cap_is_refused_by_its_ratio(tmp_path: Path, private_tmp: Path) -> None:
    path = tmp_path / "razao.zip"
    _zip_bomb(path, "dados.jsonl", 512 * 1024 * 1024)
    with pytest.raises(DatasetInvalid, match=r"razao.zip: member 'dados.jsonl' expands \d+x .*decompression bomb"):
        read(path)
    assert written_bytes(private_tmp) == 0


def test_a_zip_header_that_lies_about_the_size_cannot_write_more(tmp_path: Path, private_tmp: Path) -> None:
    path = tmp_path / "mentira.zip"
    _zip_bomb(path, "dados.jsonl", 64 * 1024 * 1024)
    raw = bytearray(path.read_bytes())
    # declare 1 KiB uncompressed in both headers: the stream still inflates to 64 MiB
    raw[22:26] = struct.pack("<I", 1024)
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 24:central + 28] = struct.pack("<I", 1024)
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetInvalid, match="mentira.zip:dados.jsonl could not be extracted"):
        read(path)


def test_a_tar_gz_bomb_is_refused_at_its_header(tmp_path: Path) -> None:
    path = tmp_path / "bomba.tar.gz"
    info = tarfile.TarInfo("dados.jsonl")
    info.size = 3 * GiB
    # the header and the first MiB of the zeros: the reader must refuse before reading further
    path.write_bytes(gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024 * 1024)))
    started = time.monotonic()
    with pytest.raises(DatasetInvalid, match=r"bomba.tar.gz: member 'dados.jsonl' expands to 3.0 GiB"):
        read(path)
    assert time.monotonic() - started < 1


def test_too_many_members_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_ARCHIVE_MEMBERS", 3)
    path = make_zip(tmp_path / "muitos.zip", {f"parte_{index}.jsonl": jsonl(chat("a", "b")) for index in range(5)})
    with pytest.raises(DatasetInvalid, match="muitos.zip holds more than 3 entries"):
        read(path)


def test_a_damaged_zip_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "quebrado.zip"
    path.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(DatasetInvalid, match="quebrado.zip is not a readable ZIP archive"):
        read(path)
