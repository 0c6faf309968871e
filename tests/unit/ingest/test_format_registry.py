"""One table of containers and record formats: the upload sniff and ingest classify every file alike.

For every container of ``afina.core.datasets.formats`` and every suffix it lists, a real file of
that kind is classified by the gateway's ``UploadSniffer`` and by ingest's ``file_container``, and
ingest reads it; the one line limit refuses the same line on both sides; and the record formats
of core (the API's names and options sections) and of ingest (detector and converter) agree.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.fernet import Fernet

from afina.core.datasets.formats import (
    CONTAINERS,
    CONTAINERS_BY_NAME,
    MAX_LINE_BYTES,
    RECORD_FORMATS,
    SNIFF_BYTES,
    detect_container,
)
from afina.core.datasets.options import ContainerFormat, DatasetFormat, EncryptionOptions, IngestOptions
from afina.core.datasets.sniff import UploadSniffer
from afina.core.errors import DatasetInvalid, InvalidRequest
from afina.ingest.formats import detect_format, to_examples
from afina.ingest.formats.registry import FORMATS
from afina.ingest.records import Example, SourceRow
from afina.ingest.sources import file_container, open_rows

KEY_ENV = "AFINA_TEST_REGISTRY_KEY"
RECORDS = [{"text": "primeiro documento"}, {"text": "segundo documento"}]
JSONL = b"".join(orjson.dumps(record) + b"\n" for record in RECORDS)


def _tar(data: bytes, mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        info = tarfile.TarInfo("pasta/dados.jsonl")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pasta/dados.jsonl", data)
    return buffer.getvalue()


def _parquet() -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(RECORDS), buffer)
    return buffer.getvalue()


def _tar_for(suffix: str) -> bytes:
    compression = {".tar": "", ".tar.gz": "gz", ".tgz": "gz", ".tar.bz2": "bz2", ".tbz2": "bz2", ".tbz": "bz2",
                   ".tar.xz": "xz", ".txz": "xz"}[suffix]
    return _tar(JSONL, f"w:{compression}" if compression else "w")


# one builder per container: the bytes of a file of that kind named with ``suffix``
BUILDERS: dict[str, Callable[[str], bytes]] = {
    "jsonl": lambda suffix: JSONL,
    "json": lambda suffix: orjson.dumps(RECORDS, option=orjson.OPT_INDENT_2),
    "csv": lambda suffix: b"text\nprimeiro documento\nsegundo documento\n",
    "txt": lambda suffix: b"primeiro documento\n\nsegundo documento\n",
    "parquet": lambda suffix: _parquet(),
    "zip": lambda suffix: _zip(JSONL),
    "tar": _tar_for,
    "gzip": lambda suffix: gzip.compress(JSONL),
    "bzip2": lambda suffix: bz2.compress(JSONL),
    "xz": lambda suffix: lzma.compress(JSONL),
    "fernet": lambda suffix: b"",  # encrypted in the test, with the key
}
CASES = [(spec.name, suffix) for spec in CONTAINERS for suffix in spec.suffixes]


def upload_container(data: bytes, filename: str, options: IngestOptions) -> str:
    """What the gateway's upload sniff says, fed as the upload streams in."""
    sniffer = UploadSniffer(filename, options)
    for start in range(0, len(data), 64 * 1024):
        sniffer.feed(data[start:start + 64 * 1024])
    sniffer.finish()
    assert sniffer.container is not None
    return sniffer.container


def ingest_container(path: Path, filename: str, options: IngestOptions) -> str:
    spec = file_container(path, filename, options)
    assert spec is not None, f"ingest cannot tell what {filename} is"
    return spec.name


def test_every_container_has_a_case_here() -> None:
    assert set(BUILDERS) == set(CONTAINERS_BY_NAME)
    suffixes = [suffix for spec in CONTAINERS for suffix in spec.suffixes]
    assert len(suffixes) == len(set(suffixes)), "a suffix belongs to one container"
    assert {".gz", ".tar.gz", ".tgz", ".bz2", ".tar.bz2", ".xz", ".tar.xz", ".zip", ".enc"} <= set(suffixes)


@pytest.mark.parametrize(("name", "suffix"), CASES, ids=[f"{name}{suffix}" for name, suffix in CASES])
def test_the_upload_sniff_and_ingest_classify_each_suffix_alike(name: str, suffix: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    filename = f"dados.jsonl{suffix}" if CONTAINERS_BY_NAME[name].kind in ("compressed", "encrypted") \
        else f"dados{suffix}"
    options = IngestOptions()
    data = BUILDERS[name](suffix)
    if name == "fernet":
        key = Fernet.generate_key()
        monkeypatch.setenv(KEY_ENV, key.decode())
        data = Fernet(key).encrypt(JSONL)
        options = IngestOptions(encryption=EncryptionOptions(key_env=KEY_ENV, whole_file=True))
    if name == "csv" and suffix == ".tsv":
        data = data.replace(b",", b"\t")
    path = tmp_path / "upload"
    path.write_bytes(data)

    assert upload_container(data, filename, options) == name
    assert ingest_container(path, filename, options) == name
    values = [row.value for row in open_rows(path, filename, options) if row.value is not None]
    if name == "txt":
        assert values == ["primeiro documento\n\nsegundo documento\n"]
    else:
        assert values == RECORDS, f"ingest read {filename} as {values}"


def test_an_encrypted_name_without_whole_file_is_refused_on_both_sides(tmp_path: Path) -> None:
    token = Fernet(Fernet.generate_key()).encrypt(JSONL)
    path = tmp_path / "dados.jsonl.enc"
    path.write_bytes(token)
    with pytest.raises(InvalidRequest, match="whole_file"):
        upload_container(token, path.name, IngestOptions())
    with pytest.raises(DatasetInvalid, match="whole_file") as caught:
        list(open_rows(path, path.name, IngestOptions()))
    assert caught.value.rule == "encrypted_file"


@pytest.mark.parametrize(("filename", "data", "expected"), [
    ("pastas.gz", _tar(JSONL, "w:gz"), "tar"),  # a bare .gz holding a tar: what it holds decides
    ("pastas.bz2", _tar(JSONL, "w:bz2"), "tar"),
    ("dados.bin", gzip.compress(JSONL), "gzip"),  # the magic decides whatever the name
    ("dados.jsonl", _zip(JSONL), "zip"),
    ("dados.zip", JSONL, "jsonl"),  # a text file under an archive's name is read as what it is
    ("trn.json", JSONL, "jsonl"),  # JSON Lines under a .json name (seed 004)
])
def test_content_decides_over_the_name_on_both_sides(filename: str, data: bytes, expected: str,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "upload"
    path.write_bytes(data)
    assert upload_container(data, filename, IngestOptions()) == expected
    assert ingest_container(path, filename, IngestOptions()) == expected
    assert [row.value for row in open_rows(path, filename, IngestOptions()) if row.value is not None] == RECORDS


def test_a_compressed_head_cut_before_its_tar_header_falls_back_to_the_name() -> None:
    head = _tar(JSONL, "w:gz")[:12]  # nothing decompresses yet
    assert detect_container(head, "pastas.tar.gz").name == "tar"
    assert detect_container(head, "pastas.gz").name == "gzip"


@pytest.mark.parametrize("container", ["jsonl", "csv"])
def test_the_one_line_limit_applies_on_both_sides(container: str, tmp_path: Path) -> None:
    """A line of ``MAX_LINE_BYTES`` is read; one byte more is a row error in ingest (the rest is read), and in
    strict mode, where that row error fails the file, the upload sniff refuses it naming the same limit."""

    def line_of(length: int) -> bytes:
        if container == "jsonl":
            return b'{"text": "' + b"x" * (length - 12) + b'"}'
        return b'"' + b"x" * (length - 2) + b'"'

    header, short = (b"text\n", b"curta\n") if container == "csv" else (b"", b'{"text": "curta"}\n')
    filename = f"dados.{container}"
    strict, lenient = IngestOptions(mode="strict"), IngestOptions()
    for length, readable in ((MAX_LINE_BYTES, True), (MAX_LINE_BYTES + 1, False)):
        line = line_of(length)
        assert len(line) == length
        data = header + line + b"\n" + short
        path = tmp_path / filename
        path.write_bytes(data)
        rows = list(open_rows(path, filename, lenient))
        long_row = rows[0]
        assert rows[-1].value == {"text": "curta"}, "the line after is read either way"
        assert upload_container(data, filename, lenient) == container  # a row problem: ingest reports it
        if readable:
            assert upload_container(data, filename, strict) == container
            assert isinstance(long_row.value, dict) and len(long_row.value["text"]) > SNIFF_BYTES
        else:
            assert long_row.value is None and long_row.issue is not None
            assert long_row.issue.rule == "line_too_long" and long_row.issue.action == "error"
            with pytest.raises(InvalidRequest) as caught:
                upload_container(data, filename, strict)
            assert caught.value.code == "line_too_long" and f"{MAX_LINE_BYTES // 2**20} MiB" in caught.value.message
            long_line_number = 2 if container == "csv" else 1  # after the CSV header
            assert f"line {long_line_number} " in caught.value.message


def test_core_and_ingest_list_the_same_record_formats_in_the_same_order() -> None:
    assert [entry.name for entry in FORMATS] == [spec.name for spec in RECORD_FORMATS]
    assert [entry.spec for entry in FORMATS] == list(RECORD_FORMATS)
    assert set(get_args(DatasetFormat)) == {"auto"} | {spec.name for spec in RECORD_FORMATS}
    declarable = {spec.name for spec in CONTAINERS if spec.declarable}
    assert set(get_args(ContainerFormat)) == {"auto"} | declarable
    for spec in RECORD_FORMATS:
        if spec.options_section is not None:
            assert spec.options_section in IngestOptions.model_fields, spec
        if spec.section_required:
            with pytest.raises(ValueError, match=f"needs a '{spec.options_section}' section"):
                IngestOptions(format=spec.name)


@pytest.mark.parametrize(("values", "options", "expected"), [
    ([{"messages": [{"role": "user", "content": "oi"}, {"role": "assistant", "content": "olá"}]}], {}, "openai"),
    ([{"conversations": [{"from": "human", "value": "oi"}, {"from": "gpt", "value": "olá"}]}], {}, "sharegpt"),
    ([{"instruction": "diga oi", "output": "oi"}], {}, "alpaca"),
    ([{"prompt": "oi", "completion": "olá"}], {}, "prompt_completion"),
    ([{"text": "um documento"}], {}, "text"),
    (["VOCÊ: oi\nAEON: olá\n"], {}, "transcript"),
    (["um documento qualquer\n"], {}, "text"),
    ([{"title": "Caneca", "content": "Azul"}], {"columns": {"user": "{title}", "assistant": "{content}"}}, "columns"),
])
def test_each_record_format_is_detected_and_converted_through_its_entry(values: list, options: dict,
                                                                       expected: str) -> None:
    ingest = IngestOptions(**options)
    rows = [SourceRow("dados", number, value) for number, value in enumerate(values, start=1)]
    assert detect_format(rows, ingest) == expected
    examples = [item for item in to_examples(rows, ingest) if isinstance(item, Example)]
    assert examples and all(example.messages or example.text for example in examples)
