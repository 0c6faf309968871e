"""Property-based fuzzing of every ingest source and format parser, and of the upload sniffer.

The property, for arbitrary bytes, arbitrary JSON structures and arbitrary text: a parser yields
records (or row issues), or raises one of afina's typed errors (``AfinaError``: ``DatasetInvalid``,
``InvalidRequest``, ``PayloadTooLarge``), which the API and the ingest report turn into a 4xx with
a message; never another exception (a 500, a failed job with a traceback). Format converters may
also raise their own ``ConversionError``, which ``to_examples`` turns into a row issue.

The bound: every generated example finishes within ``DEADLINE`` (Hypothesis fails an example that
is slower, after replaying it), and the hostile inputs at the end (100k nesting levels, a
catastrophic regular expression, lines and fields past their caps) finish within a stated number of
CPU seconds. Example counts are set so the whole module runs in well under a minute.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import charset_normalizer  # noqa: F401 - imported here, not inside the first example's deadline
import ftfy  # noqa: F401
import ijson  # noqa: F401
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import re2  # noqa: F401
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from afina.core.datasets.formats import CONTAINERS_BY_NAME, decode_text, looks_binary
from afina.core.datasets.options import ColumnMapping, IngestOptions, PairedOptions, TranscriptOptions
from afina.core.datasets.sniff import UploadSniffer, check_archive
from afina.core.errors import AfinaError
from afina.gateway.files.service import parse_ingest_options
from afina.ingest.formats import to_examples
from afina.ingest.formats.base import ConversionError
from afina.ingest.formats.chat import from_alpaca, from_openai, from_prompt_completion, from_sharegpt
from afina.ingest.formats.columns import ColumnConverter
from afina.ingest.formats.detect import detect_format
from afina.ingest.formats.paired import pair_examples
from afina.ingest.formats.text import documents
from afina.ingest.formats.transcript import TranscriptParser
from afina.ingest.records import Example, RowIssue, SourceRow
from afina.ingest.sources import PAIRED_MEMBER_KEY, PAIRED_TEXT_KEY, open_rows
from afina.ingest.sources.encoding import plausibly_latin, sniff_encoding
from afina.ingest.sources.limits import MAX_LINE_BYTES
from afina.ingest.sources.lines import iter_lines

DEADLINE = timedelta(milliseconds=2000)  # generous: CI machines are shared and noisy


def fuzz(examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Hypothesis settings for this module: a per-example deadline, no example database left in the tree."""
    return settings(max_examples=examples, deadline=DEADLINE, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# what the parsers are fed ---------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=5)
                           | st.dictionaries(st.text(max_size=8), children, max_size=5), max_leaves=25)
# the keys the format detector and the converters look for, so records reach every converter
RECORD_KEYS = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text",
               "system", "history", "role", "content", "from", "value", "split", "title")
message_like = st.dictionaries(st.sampled_from(("role", "content", "from", "value", "type", "text")),
                               json_values | st.sampled_from(("user", "assistant", "system", "human", "gpt")),
                               max_size=4)
record_values = json_values | st.lists(message_like, max_size=4) | st.lists(st.text(max_size=10), max_size=3)
records = st.dictionaries(st.sampled_from(RECORD_KEYS) | st.text(max_size=6), record_values, max_size=5)

FILE_NAMES = ("data.jsonl", "data.json", "data.csv", "data.tsv", "data.txt", "data", "data.parquet", "data.zip",
              "data.tar.gz", "data.jsonl.gz", "data.md", "data.ndjson")
CONTAINERS = ("auto", "jsonl", "json", "csv", "txt", "parquet", "zip", "tar")
ENCODINGS = (None, "utf-8", "latin-1", "cp1252", "utf-16", "utf-16-le", "utf-32", "ascii", "rot13", "base64",
             "unicode_escape", "idna", "no-such-codec")
FORMATS = ("auto", "openai", "sharegpt", "alpaca", "prompt_completion", "text", "transcript", "paired")

# text that looks like what users upload, so the parsers get past their first check
text_lines = st.lists(st.sampled_from(("VOCÊ: oi", "AEON: olá", "VOCÃŠ: quanto é 7x8?", "User: hi", "Bot: hello",
                                       "", "", "[sistema] ok", "=== fim ===", "a" * 50 + "b", "{\"text\": 1}",
                                       "a,b,c", '"x",1', "\ufeff", "\r")) | st.text(max_size=40), max_size=25)
PATTERNS = (r"^\[sistema\]", r"^=== ", r"^(a|a)*$", r"(x+x+)+y", r"\d{2}:\d{2}", r"(?i)^sys", "", r".{300}",
            r"\p{L}+", r"[", r"(?=x)", r"(a)\1", r"a{2,1}")


def issues_or_examples(items: Iterable[object]) -> list[object]:
    found = list(items)
    for item in found:
        assert isinstance(item, Example | RowIssue), type(item)
    return found


def source_rows(rows: Iterable[object]) -> Iterator[SourceRow]:
    for row in rows:
        assert isinstance(row, SourceRow), type(row)
        assert row.line >= 0
        assert row.value is not None or row.issue is not None, "a row with no value must say why"
        yield row


@contextmanager
def written(data: bytes, name: str) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="afina-fuzz-"))
    try:
        path = folder / "upload"
        path.write_bytes(data)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ingest(data: bytes, name: str, options: IngestOptions) -> None:
    """Every row of the file, through the format converters: the property is that only typed errors escape."""
    with written(data, name) as path:
        try:
            issues_or_examples(to_examples(source_rows(open_rows(path, name, options)), options))
        except AfinaError:
            pass


def options_or_skip(**values: Any) -> IngestOptions:
    try:
        return IngestOptions(**values)
    except ValidationError:  # the gateway answers these 400 before ingest ever sees them (tested below)
        return IngestOptions()


# sources: arbitrary bytes under every name and container --------------------------------------------------

@fuzz(250)
@given(data=st.binary(max_size=1500), name=st.sampled_from(FILE_NAMES), container=st.sampled_from(CONTAINERS),
       encoding=st.sampled_from(ENCODINGS))
def test_any_bytes_in_any_container(data: bytes, name: str, container: str, encoding: str | None) -> None:
    ingest(data, name, options_or_skip(container=container, encoding=encoding))


@fuzz(150)
@given(values=st.lists(json_values | records, max_size=8), layout=st.sampled_from(("jsonl", "array", "wrapper",
                                                                                     "pretty", "single")),
       fmt=st.sampled_from(FORMATS), cut=st.integers(0, 50))
def test_any_json_structure(values: list[Any], layout: str, fmt: str, cut: int) -> None:
    if layout == "jsonl":
        data = "\n".join(json.dumps(value) for value in values).encode()
    elif layout == "array":
        data = json.dumps(values).encode()
    elif layout == "wrapper":
        data = json.dumps({"data": values}, indent=1).encode()
    elif layout == "pretty":
        data = json.dumps(values, indent=2, ensure_ascii=False).encode()
    else:
        data = json.dumps(values[0] if values else {}, indent=1).encode()
    name = "data.jsonl" if layout == "jsonl" else "data.json"
    options = options_or_skip(format=fmt)
    ingest(data, name, options)
    if cut:  # the same document cut short, as an interrupted upload leaves it
        ingest(data[: max(1, len(data) - cut)], name, options)


@fuzz(120)
@given(rows=st.lists(st.lists(st.text(max_size=12) | st.sampled_from(('"', '""', "\n", "\r\n", ",", ";", "\t")),
                              min_size=1, max_size=5), max_size=8),
       delimiter=st.sampled_from((None, ",", ";", "\t", "|")), raw=st.booleans(),
       fmt=st.sampled_from(("auto", "text", "prompt_completion")))
def test_any_csv(rows: list[list[str]], delimiter: str | None, raw: bool, fmt: str) -> None:
    if raw:  # cells joined without quoting: broken quotes, ragged rows
        text = "\n".join((delimiter or ",").join(row) for row in rows)
    else:
        buffer = io.StringIO()
        csv.writer(buffer, delimiter=delimiter or ",").writerows(rows)
        text = buffer.getvalue()
    ingest(text.encode(), "data.tsv" if delimiter == "\t" else "data.csv", options_or_skip(csv_delimiter=delimiter,
                                                                                           format=fmt))


@fuzz(100)
@given(columns=st.dictionaries(st.sampled_from(("text", "prompt", "completion", "messages", "n", "tags")),
                               st.sampled_from(("str", "int", "float", "list", "struct", "null")), min_size=1,
                               max_size=4),
       count=st.integers(1, 5), corrupt=st.one_of(st.none(), st.integers(0, 10_000)),
       truncate=st.integers(0, 64), seed=st.text(max_size=20))
def test_parquet_files_whole_and_damaged(columns: dict[str, str], count: int, corrupt: int | None, truncate: int,
                                         seed: str) -> None:
    makers: dict[str, Callable[[int], Any]] = {
        "str": lambda index: f"{seed}{index}", "int": lambda index: index, "float": lambda index: index / 3,
        "list": lambda index: [seed] * index, "struct": lambda index: {"role": "user", "content": seed},
        "null": lambda index: None}
    table = pa.table({name: [makers[kind](index) for index in range(count)] for name, kind in columns.items()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = bytearray(buffer.getvalue())
    if corrupt is not None:
        data[corrupt % len(data)] ^= 0xFF
    if truncate:
        data = data[: max(4, len(data) - truncate)] + b"PAR1"  # the footer magic, as if whole
    ingest(bytes(data), "data.parquet", IngestOptions())


member_names = st.sampled_from(("a.jsonl", "inputs/x.txt", "outputs/x.md", "inputs/y.txt", "../evil.txt",
                                "/abs.txt", "c:\\win.txt", "dir/", "__MACOSX/a", ".hidden", "b.csv", "n.zip",
                                "deep/er/c.json", "inputs/", "outputs/.txt")) | st.text(max_size=12)
member_data = st.sampled_from((b'{"text": "oi"}\n', b'[{"text": 1}]', b"a,b\n1,2\n", "VOCÊ: oi\nAEON: olá\n".encode(),
                               b"PK\x03\x04", b"")) | st.binary(max_size=200)


@pytest.mark.filterwarnings("ignore:Duplicate name")  # generated members may share a name
@fuzz(120)
@given(members=st.lists(st.tuples(member_names, member_data), min_size=0, max_size=5),
       kind=st.sampled_from(("zip", "tar.gz", "tar")), flip=st.one_of(st.none(), st.integers(0, 5000)),
       fmt=st.sampled_from(("auto", "paired", "text")))
def test_archives_with_any_members(members: list[tuple[str, bytes]], kind: str, flip: int | None, fmt: str) -> None:
    buffer = io.BytesIO()
    try:
        if kind == "zip":
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for name, data in members:
                    archive.writestr(name or "unnamed", data)
        else:
            with tarfile.open(fileobj=buffer, mode="w:gz" if kind == "tar.gz" else "w") as archive:
                for name, data in members:
                    info = tarfile.TarInfo(name or "unnamed")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    except (ValueError, IndexError):  # a name the archive format itself cannot hold ("\x00")
        assume(False)
    data = bytearray(buffer.getvalue())
    if flip is not None and data:
        data[flip % len(data)] ^= 0x55
    ingest(bytes(data), f"data.{kind}", options_or_skip(format=fmt))


@fuzz(60)
@given(payload=st.binary(max_size=300) | st.sampled_from((b'{"text": "oi"}\n', b"a,b\n1,2\n")),
       flip=st.one_of(st.none(), st.integers(0, 400)), suffix=st.sampled_from(("jsonl.gz", "gz", "csv.gz")))
def test_gzip_single_files(payload: bytes, flip: int | None, suffix: str) -> None:
    data = bytearray(gzip.compress(payload))
    if flip is not None:
        data[flip % len(data)] ^= 0x0F
    ingest(bytes(data), f"data.{suffix}", IngestOptions())


@fuzz(150)
@given(data=st.binary(max_size=600), override=st.sampled_from(ENCODINGS))
def test_encoding_sniffer(data: bytes, override: str | None) -> None:
    plausibly_latin(data)
    with written(data, "data.txt") as path:
        try:
            encoding = sniff_encoding(path, "data.txt", override)
        except AfinaError:
            return
    if override is None and encoding.invalid_utf8_at is None and encoding.codec in ("utf-8", "cp1252"):
        encoding.decode(data)  # what the sniffer accepted as UTF-8 or Latin text decodes, whole


@fuzz(150)
@given(data=st.binary(max_size=400), limit=st.integers(1, 40), as_text=st.booleans())
def test_line_splitter_keeps_every_byte_or_reports_it(data: bytes, limit: int, as_text: bool) -> None:
    if as_text:
        handle: Any = io.StringIO(data.decode("latin-1"), newline="\n")  # as JSONL opens text
        text: Any = data.decode("latin-1")
    else:
        handle, text = io.BytesIO(data), data
    lines = list(iter_lines(handle, limit))
    assert [line.number for line in lines] == list(range(1, len(lines) + 1))
    physical = text.split("\n" if as_text else b"\n")
    if physical and not physical[-1]:
        physical.pop()
    assert len(lines) == len(physical)
    for line, raw in zip(lines, physical, strict=True):
        if line.oversize:
            assert line.oversize > limit and not line.text
        else:
            assert line.text == raw.rstrip("\r\n" if as_text else b"\r\n")


# formats: arbitrary records into every converter ----------------------------------------------------------

@fuzz(300)
@given(record=records)
def test_chat_converters(record: dict[str, Any]) -> None:
    for convert in (from_openai, from_sharegpt, from_alpaca, from_prompt_completion):
        try:
            messages = convert(record)
        except ConversionError as exc:
            assert exc.field and exc.rule and exc.detail
            continue
        assert isinstance(messages, list) and all(isinstance(message, dict) for message in messages)


@fuzz(150)
@given(user=st.text(min_size=1, max_size=30), assistant=st.text(min_size=1, max_size=30),
       system=st.none() | st.text(max_size=20), required=st.lists(st.text(max_size=5), max_size=3),
       rows=st.lists(st.dictionaries(st.text(max_size=5) | st.sampled_from(("title", "x", "")), json_values,
                                     max_size=4), max_size=4))
def test_column_templates(user: str, assistant: str, system: str | None, required: list[str],
                          rows: list[dict[str, Any]]) -> None:
    converter = ColumnConverter(ColumnMapping(user=user, assistant=assistant, system=system,
                                              required_columns=required))
    for row in rows:
        try:
            messages = converter(row)
        except ConversionError as exc:
            assert exc.action == "dropped"
            continue
        assert [message["role"] for message in messages][-2:] == ["user", "assistant"]


@fuzz(150)
@given(members=st.lists(st.tuples(member_names | st.text(max_size=10), st.text(max_size=20) | json_values),
                        max_size=6),
       inputs_dir=st.sampled_from(("inputs", "in/", "", "/")), template=st.text(max_size=20) | st.just("{input}{name}"),
       plain=st.lists(json_values, max_size=2))
def test_paired_members(members: list[tuple[str, Any]], inputs_dir: str, template: str, plain: list[Any]) -> None:
    rows = [SourceRow(f"a.zip:{name}", 1, {PAIRED_MEMBER_KEY: name, PAIRED_TEXT_KEY: text}) for name, text in members]
    rows += [SourceRow("a.zip:x", 1, value) for value in plain]
    issues_or_examples(pair_examples(rows, PairedOptions(inputs_dir=inputs_dir, prompt_template=template)))


@fuzz(150)
@given(lines=text_lines, first_line=st.integers(0, 5))
def test_text_documents(lines: list[str], first_line: int) -> None:
    text = "\n".join(lines)
    found = list(documents(text, "a.txt", first_line))
    assert all(example.text and example.text.strip() for example in found)
    assert sum(example.text.count("\n") + 1 for example in found) <= len(text.split("\n"))
    assert all(first_line <= example.line < first_line + len(text.split("\n")) for example in found)


@fuzz(200)
@given(lines=text_lines, speakers=st.dictionaries(st.text(min_size=1, max_size=8).map(lambda text: text + ":"),
                                                  st.sampled_from(("system", "user", "assistant")), max_size=4),
       patterns=st.lists(st.sampled_from(PATTERNS) | st.text(max_size=12), max_size=4),
       gap=st.integers(0, 3), turns=st.integers(0, 2))
def test_transcripts_with_any_options(lines: list[str], speakers: dict[str, str], patterns: list[str], gap: int,
                                      turns: int) -> None:
    section = {"speakers": {**speakers, "VOCÊ:": "user", "AEON:": "assistant"}, "ignore_patterns": patterns,
               "conversation_gap": gap, "max_turns_per_example": turns}
    try:  # the gateway's own parser of the upload's ingest_options
        options = parse_ingest_options(json.dumps({"format": "transcript", "transcript": section}))
    except AfinaError as exc:
        assert exc.http_status == 400 and exc.param and exc.param.startswith("ingest_options.transcript")
        return
    assert options.transcript is not None
    parser = TranscriptParser(options.transcript)
    text = "\n".join(lines)
    parser.looks_like_transcript(text)
    issues_or_examples(parser.parse(text, "chat.log"))


@fuzz(200)
@given(sample=st.lists(st.one_of(records, st.text(max_size=60), json_values), max_size=6),
       transcript=st.booleans())
def test_format_detection(sample: list[Any], transcript: bool) -> None:
    rows = [SourceRow("a.jsonl", index + 1, value) for index, value in enumerate(sample)]
    options = IngestOptions(transcript=TranscriptOptions() if transcript else None)
    try:
        assert detect_format(rows, options) in FORMATS
    except AfinaError:
        pass


# the upload sniffer (gateway): only InvalidRequest, whatever arrives ---------------------------------------

@fuzz(300)
@given(data=st.binary(max_size=2000) | text_lines.map(lambda lines: "\n".join(lines).encode()),
       name=st.sampled_from(FILE_NAMES + ("x.gz", "x.tgz", "x.pq", "x.bz2", "x.tar.xz", "x.enc", "noext")),
       chunk=st.integers(1, 700),
       container=st.sampled_from(CONTAINERS), fmt=st.sampled_from(FORMATS))
def test_upload_sniffer(data: bytes, name: str, chunk: int, container: str, fmt: str) -> None:
    decode_text(data)
    looks_binary(data)
    sniffer = UploadSniffer(name, options_or_skip(container=container, format=fmt))
    try:
        for start in range(0, len(data), chunk):
            sniffer.feed(data[start:start + chunk])
        sniffer.finish()
    except AfinaError as exc:
        assert exc.http_status == 400 and exc.param == "file"
        return
    assert sniffer.container in CONTAINERS_BY_NAME


@pytest.mark.filterwarnings("ignore:Duplicate name")  # generated members may share a name
@fuzz(80)
@given(members=st.lists(st.tuples(member_names, st.binary(max_size=50)), max_size=4),
       flip=st.one_of(st.none(), st.integers(0, 3000)))
def test_upload_archive_check(members: list[tuple[str, bytes]], flip: int | None) -> None:
    buffer = io.BytesIO()
    try:
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, data in members:
                archive.writestr(name or "unnamed", data)
    except (ValueError, IndexError):  # a name a ZIP cannot hold
        assume(False)
    data = bytearray(buffer.getvalue())
    if flip is not None and data:
        data[flip % len(data)] ^= 0xA5
    with written(bytes(data), "a.zip") as path:
        try:
            check_archive(path, "a.zip", max_expanded_bytes=10_000)
        except AfinaError as exc:
            assert exc.http_status in (400, 413)


# hostile inputs, each with a bound on its work ------------------------------------------------------------

DEEP = 100_000


def _deep_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("deep.json", b"[" * DEEP)
        archive.writestr("ok.jsonl", b'{"text": "oi"}\n')
    return buffer.getvalue()


WORST_CASES: dict[str, tuple[bytes, str, dict[str, Any]]] = {
    "json-100k-arrays": (b"[" * DEEP, "a.json", {}),
    "json-100k-objects": (b'[{"a": ' * DEEP, "a.json", {}),
    "json-100k-closed": (b"[" * DEEP + b"]" * DEEP, "a.json", {}),
    "jsonl-100k": (b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}\n" + b'{"text": "oi"}\n', "a.jsonl", {}),
    "csv-cell-100k": (b'messages\n"' + b"[" * DEEP + b'"\n', "a.csv", {"format": "openai"}),
    "zip-member-100k": (_deep_zip(), "a.zip", {}),
    "gz-100k": (gzip.compress(b"[" * DEEP), "a.json.gz", {}),
    # a 4 MB key above 200k keys: a parser that builds a path prefix per event copies the key 200k times
    "long-key-path": (b'[{"' + b"k" * 4_000_000 + b'": {' + b", ".join(b'"k%d": 1' % index for index in range(200_000))
                      + b"}}]", "a.json", {}),
    "catastrophic-regex": (("VOCÊ: oi\n" + "a" * 200_000 + "b\n") .encode() * 3 + "AEON: olá\n".encode(), "a.txt",
                           {"format": "transcript", "transcript": {"ignore_patterns": [r"^(a|a)*$", r"(x+x+)+y"]}}),
    "line-over-cap": (b'{"text": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}\n{"text": "oi"}\n', "a.jsonl", {}),
    "unclosed-csv-quote": (b'a,b\n1,"' + b"y" * 1000 + (b"\n" + b"y" * 1000) * 20_000, "a.csv", {}),
    "blank-lines": (b"\n" * 2_000_000 + b'{"text": "oi"}\n', "a.jsonl", {}),
    "many-tiny-records": (b'{"text": "x"}\n' * 20_000, "a.jsonl", {}),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(WORST_CASES))
def test_hostile_inputs_finish_within_their_bound(case: str) -> None:
    data, name, options = WORST_CASES[case]
    started = time.process_time()
    ingest(data, name, IngestOptions(**options))
    spent = time.process_time() - started
    assert spent < 10, f"{case}: {spent:.1f} CPU seconds, bound 10"


@pytest.mark.timeout(60)
def test_the_sniffer_on_hostile_heads() -> None:
    for data, name in ((b"[" * DEEP, "a.json"), (b'{"a": ' * DEEP, "a.jsonl"), (b"\n" * 200_000, "a.jsonl"),
                       (b"a" * 200_000, "a.csv"), (codecs.BOM_UTF16_LE + "x".encode("utf-16-le") * 50_000, "a.txt")):
        started = time.process_time()
        sniffer = UploadSniffer(name)
        try:
            for start in range(0, len(data), 65536):
                sniffer.feed(data[start:start + 65536])
            sniffer.finish()
        except AfinaError:
            pass
        assert time.process_time() - started < 2, name
