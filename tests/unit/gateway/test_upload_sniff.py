"""The upload-time look at a file: which dataset container it is, or a 400 that says why not."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from afina.core.datasets.formats import MAX_LINE_BYTES, SNIFF_BYTES
from afina.core.datasets.options import IngestOptions
from afina.core.datasets.sniff import UploadSniffer, check_archive
from afina.core.errors import InvalidRequest


def sniff(data: bytes, name: str = "upload.jsonl", chunk: int = 7, options: IngestOptions | None = None) -> str:
    sniffer = UploadSniffer(name, options)
    for start in range(0, len(data), chunk):
        sniffer.feed(data[start:start + chunk])
    sniffer.finish()
    assert sniffer.container is not None
    return sniffer.container


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(("data", "name", "container"), [
    (b'{"messages": []}\n{"messages": []}\n', "train.jsonl", "jsonl"),
    (b'\xef\xbb\xbf{"a": 1}\r\n{"b": 2}\r\n', "bom.jsonl", "jsonl"),
    ('{"texto": "ação"}\n'.encode("latin-1"), "latin1.jsonl", "jsonl"),
    (b'[{"instruction": "a", "output": "b"}]', "data.json", "json"),
    (b'{"data": [1, 2]}', "data.json", "jsonl"),  # one whole object on the first line: JSON Lines, as ingest reads it
    (b'{\n  "data": [1, 2]\n}\n', "data.json", "json"),
    (b'title,content\n"Caneca","Linha 1\nLinha 2"\n', "produtos.csv", "csv"),
    ("VOCÊ: oi\nAEON: olá\n".encode(), "chat.txt", "txt"),
    (b'{"a": 1}\n', "no-extension", "jsonl"),
    (b"PAR1" + b"\x00" * 32 + b"PAR1", "df.parquet", "parquet"),
    (b"\x1f\x8b\x08\x00" + b"\x00" * 40, "pastas.tar.gz", "tar"),
])
def test_containers_are_recognized(data: bytes, name: str, container: str) -> None:
    assert sniff(data, name) == container


def test_a_zip_is_recognized_by_its_magic_whatever_its_name() -> None:
    assert sniff(zip_bytes({"inputs/a.txt": b"x"}), "upload.bin") == "zip"


@pytest.mark.parametrize(("data", "name", "why"), [
    (b"", "empty.jsonl", "empty"),
    (b"\n\r\n  \n", "blank.jsonl", "empty"),
    (bytes(range(256)) * 40, "random.bin", "not text"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "photo.jsonl", "not text"),
    (b"[1, 2, 3]\n", "numbers.json", "array of numbers"),
    (b"[]", "nothing.json", "empty JSON array"),
    (b"[1, 2, 3]\n", "numbers.jsonl", "array of numbers"),  # "[" opens a JSON array whatever the name
    (b'{"messages": [{"role": "user", "content": "cut\n{"a": 1}\n', "cut.jsonl", "line 1 is not valid JSON"),
    (b"title,content\n", "header-only.csv", "header row and at least one data row"),
    (b"just some words\n", "notes.dat", "cannot be told"),
    (b"PAR1\x00\x00\x00", "cut.parquet", "footer"),
])
def test_what_is_no_dataset_is_refused_with_the_reason(data: bytes, name: str, why: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        sniff(data, name)
    assert why in caught.value.message
    assert name in caught.value.message and caught.value.param == "file"


def test_only_the_first_line_decides_later_broken_lines_are_row_errors() -> None:
    assert sniff(b'{"a": 1}\n{"b": \n{"c": 3}\n') == "jsonl"


def test_a_first_line_longer_than_the_head_is_judged_by_how_it_starts() -> None:
    line = b'{"messages": [{"role": "user", "content": "' + b"x" * (SNIFF_BYTES * 2) + b'"}]}\n'
    assert sniff(line, chunk=SNIFF_BYTES // 3) == "jsonl"
    with pytest.raises(InvalidRequest):
        sniff(b"x" * (SNIFF_BYTES * 2), "long.jsonl", chunk=SNIFF_BYTES // 3)


@pytest.mark.parametrize("chunk", [MAX_LINE_BYTES * 3, 1024 * 1024])
def test_in_strict_mode_a_line_past_the_limit_is_refused_wherever_it_lies(chunk: int) -> None:
    """Also a whole long line inside one large chunk; lenient mode leaves it to ingest, which reports the row."""
    short = b'{"text": "curta"}\n'
    data = short * 3 + b'{"text": "' + b"x" * MAX_LINE_BYTES + b'"}\n' + short
    assert sniff(data, chunk=chunk) == "jsonl"
    with pytest.raises(InvalidRequest) as caught:
        sniff(data, chunk=chunk, options=IngestOptions(mode="strict"))
    assert "line 4 is longer than the 16 MiB per-line limit" in caught.value.message
    assert sniff(short * 3 + b'{"text": "' + b"x" * (MAX_LINE_BYTES - 12) + b'"}\n' + short, chunk=chunk,
                 options=IngestOptions(mode="strict")) == "jsonl"


def test_an_explicit_container_must_match_the_bytes() -> None:
    assert sniff(b"just some words\n", "notes.dat", options=IngestOptions(container="txt")) == "txt"
    with pytest.raises(InvalidRequest) as caught:
        sniff(b'{"a": 1}\n', "x.zip", options=IngestOptions(container="zip"))
    assert "declared zip" in caught.value.message


def test_archive_with_a_traversal_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.zip"
    path.write_bytes(zip_bytes({"inputs/ok.txt": b"ok", "../../etc/cron.d/x": b"boom"}))
    with pytest.raises(InvalidRequest) as caught:
        check_archive(path, "evil.zip", max_expanded_bytes=2**30)
    assert "../../etc/cron.d/x" in caught.value.message and "path traversal" in caught.value.message
    assert caught.value.code == "unsafe_archive_member"


def test_archive_that_expands_past_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    path.write_bytes(zip_bytes({"a.txt": b"0" * 3_000_000, "b.txt": b"0" * 3_000_000}))
    with pytest.raises(InvalidRequest) as caught:
        check_archive(path, "bomb.zip", max_expanded_bytes=5_000_000)
    assert "decompression bomb" in caught.value.message and "'b.txt'" in caught.value.message
    check_archive(path, "bomb.zip", max_expanded_bytes=10_000_000)  # within the limit: accepted


def test_a_corrupt_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.zip"
    path.write_bytes(zip_bytes({"a.txt": b"hello" * 100})[:-30])
    with pytest.raises(InvalidRequest) as caught:
        check_archive(path, "cut.zip", max_expanded_bytes=2**30)
    assert "not a valid ZIP" in caught.value.message
