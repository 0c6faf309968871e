"""Inputs built to exhaust the ingest worker: each meets a limit, checked before the work starts, and a clear
error; each finishes in a bounded time (CPU seconds of this process, so a busy machine does not make the
bound flaky; the pytest timeout stops a regression from hanging the suite)."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from afina.core.datasets.options import (
    MAX_IGNORE_PATTERN_CHARS,
    MAX_IGNORE_PATTERNS,
    MAX_IGNORE_PROGRAM_SIZE,
    IngestOptions,
    TranscriptOptions,
)
from afina.core.errors import DatasetInvalid, InvalidRequest
from afina.gateway.files.service import parse_ingest_options
from afina.ingest.formats import to_examples
from afina.ingest.formats.transcript import TranscriptParser
from afina.ingest.records import Example, RowIssue, SourceRow
from afina.ingest.sources import open_rows
from afina.ingest.sources.limits import MAX_CSV_FIELD_CHARS, MAX_JSON_DEPTH

CATASTROPHIC = r"^(a|a)*$"  # Python's re backtracks 2^n times on "aaa...ab"


@contextmanager
def cpu_bound(seconds: float) -> Iterator[None]:
    started = time.process_time()
    yield
    spent = time.process_time() - started
    assert spent < seconds, f"took {spent:.1f} CPU seconds, the bound is {seconds}"


def read(path: Path, **options: Any) -> list[SourceRow]:
    return list(open_rows(path, path.name, IngestOptions(**options)))


def row_issues(rows: list[SourceRow]) -> list[tuple[int, str, str]]:
    return [(row.line, row.issue.rule, row.issue.field) for row in rows if row.issue is not None]


# (a) ignore_patterns: RE2, validated when the options are parsed ---------------------------------------------

@pytest.mark.timeout(60)
def test_a_catastrophic_pattern_runs_in_linear_time(tmp_path: Path) -> None:
    log = tmp_path / "chat.log"
    log.write_text("VOCÊ: oi\n" + "a" * 100_000 + "b\n" + "AEON: olá\n" + "a" * 5000 + "\n", encoding="utf-8")
    options = IngestOptions(format="transcript", transcript=TranscriptOptions(ignore_patterns=[CATASTROPHIC]))
    with cpu_bound(2):
        items = list(to_examples(open_rows(log, log.name, options), options))
    [example] = [item for item in items if isinstance(item, Example)]
    # "aaa...ab" does not match, so it stays in the user's turn; the all-"a" line matches and is noise
    assert example.messages[0]["content"] == "oi\n" + "a" * 100_000 + "b"
    assert example.messages[1]["content"] == "olá"
    assert any(isinstance(item, RowIssue) and item.rule == "transcript_noise" for item in items)


@pytest.mark.parametrize(("patterns", "index", "why"), [
    ([r"^\[sistema\]", r"(?=look)ahead"], 1, "look-arounds are not supported"),
    ([r"(a)\1"], 0, "back-references"),
    ([r"[unclosed"], 0, "missing ]"),
    ([r"ok", "x" * (MAX_IGNORE_PATTERN_CHARS + 1)], 1, f"at most {MAX_IGNORE_PATTERN_CHARS} are allowed"),
    ([r"\w{999}", r"\w{999}"], 1, f"over the limit of {MAX_IGNORE_PROGRAM_SIZE}"),
], ids=["lookahead", "backreference", "syntax", "too-long", "program-size"])
def test_a_pattern_afina_cannot_run_is_a_400_naming_it(patterns: list[str], index: int, why: str) -> None:
    text = orjson.dumps({"format": "transcript", "transcript": {"ignore_patterns": patterns}}).decode()
    with pytest.raises(InvalidRequest) as caught:
        parse_ingest_options(text)
    assert caught.value.http_status == 400
    assert caught.value.param == "ingest_options.transcript.ignore_patterns"
    assert f"transcript.ignore_patterns[{index}]" in caught.value.message and why in caught.value.message


def test_too_many_patterns_or_speakers_are_refused() -> None:
    with pytest.raises(ValidationError, match=f"at most {MAX_IGNORE_PATTERNS} are allowed"):
        TranscriptOptions(ignore_patterns=["x"] * (MAX_IGNORE_PATTERNS + 1))
    speakers = {f"S{index}:": "user" for index in range(40)} | {"B:": "assistant"}
    with pytest.raises(ValidationError, match="at most 32 are allowed"):
        TranscriptOptions(speakers=speakers)
    with pytest.raises(ValidationError, match="longer than 40 characters"):
        TranscriptOptions(speakers={"U" * 41 + ":": "user", "B:": "assistant"})


def test_the_parser_refuses_a_pattern_that_skipped_validation() -> None:
    options = TranscriptOptions.model_construct(speakers={"U:": "user", "B:": "assistant"},
                                                ignore_patterns=["ok", "(?<=x)y"], conversation_gap=2,
                                                max_turns_per_example=1)
    with pytest.raises(InvalidRequest) as caught:
        TranscriptParser(options)
    assert caught.value.param == "transcript.ignore_patterns[1]"


def test_ordinary_patterns_keep_working() -> None:
    parser = TranscriptParser(TranscriptOptions(ignore_patterns=[r"^\[sistema\]", r"(?i)^=== ", r"^\d{2}:\d{2}$"]))
    items = list(parser.parse("[sistema] início\nVOCÊ: oi\n=== sessão ===\n12:30\nAEON: olá\n", "log.txt"))
    [example] = [item for item in items if isinstance(item, Example)]
    assert example.messages == [{"role": "user", "content": "oi"}, {"role": "assistant", "content": "olá"}]


# (b) JSON nesting: capped while parsing, in linear time -------------------------------------------------------

DEEP = 100_000


@pytest.mark.timeout(60)
@pytest.mark.parametrize("document", [b"[" * DEEP, b'[{"a": ' * DEEP, b'{"a": ' * DEEP, b"[" + b"[" * DEEP + b"]" * DEEP
                                      + b"]"], ids=["arrays", "objects-in-array", "object", "closed"])
def test_a_json_document_nested_100k_deep_is_refused_fast(tmp_path: Path, document: bytes) -> None:
    path = tmp_path / "deep.json"
    path.write_bytes(document)
    with cpu_bound(2), pytest.raises(DatasetInvalid) as caught:
        read(path)
    assert caught.value.rule == "json_too_deep"
    assert f"more than {MAX_JSON_DEPTH} levels deep" in caught.value.message


def test_json_array_records_at_the_cap_are_read_and_one_past_it_names_the_element(tmp_path: Path) -> None:
    def nested(levels: int) -> dict[str, Any]:  # an object of ``levels`` levels of objects and arrays
        value: Any = 1
        for _ in range(levels - 1):
            value = [value]
        return {"a": value}

    path = tmp_path / "data.json"
    path.write_bytes(orjson.dumps([{"text": "ok"}, nested(MAX_JSON_DEPTH - 1)]))  # the array is one more level
    assert [row.line for row in read(path)] == [1, 2]
    path.write_bytes(orjson.dumps([{"text": "ok"}, {"text": "ok"}, nested(MAX_JSON_DEPTH)]))
    with pytest.raises(DatasetInvalid, match="array element 3 nests"):
        read(path)


@pytest.mark.timeout(60)
def test_a_jsonl_line_nested_too_deep_is_a_row_error(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [b'{"text": "ok"}', b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}", b'{"a": ' + b"[" * MAX_JSON_DEPTH
             + b"]" * MAX_JSON_DEPTH + b"}", b'{"text": "' + b"[" * 5000 + b'"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    with cpu_bound(2):
        rows = read(path)
    assert row_issues(rows) == [(2, "json_too_deep", "line"), (3, "json_too_deep", "line")]
    assert [row.line for row in rows if row.value is not None] == [1, 4]  # brackets inside a string are text


def test_json_text_in_a_csv_cell_is_capped_too(tmp_path: Path) -> None:
    deep = "[" * 1000 + "]" * 1000
    path = tmp_path / "chats.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerow(['[{"role": "user", "content": "oi"}, {"role": "assistant", "content": "olá"}]'])
        writer.writerow([f'[{{"role": "user", "content": {deep}}}]'])
    options = IngestOptions(format="openai")
    items = list(to_examples(open_rows(path, path.name, options), options))
    assert isinstance(items[0], Example)
    assert (items[1].line, items[1].rule, items[1].field) == (3, "json_too_deep", "messages")


# (c) CSV fields: afina's own limit, the process-wide one untouched ------------------------------------------

def test_reading_a_csv_leaves_the_process_wide_field_limit_alone(tmp_path: Path) -> None:
    before = csv.field_size_limit()
    path = tmp_path / "big.csv"
    path.write_text('title,description\nlamp,"' + "x" * 300_000 + '"\n', encoding="utf-8")
    [row] = read(path)
    assert len(row.value["description"]) == 300_000  # over csv's own 128 KiB default: afina's limit applies
    assert csv.field_size_limit() == before


@pytest.mark.timeout(60)
def test_a_csv_field_over_the_limit_names_its_row_and_column(tmp_path: Path) -> None:
    line = "y" * (1024 * 1024)  # each physical line is under the line cap; the quoted field spans 17 of them
    field = "\n".join([line] * (MAX_CSV_FIELD_CHARS // len(line) + 1))
    path = tmp_path / "products.csv"
    path.write_text(f'title,description,price\nlamp,ok,3\nchair,"{field}",5\ntable,fine,7\n', encoding="utf-8")
    with cpu_bound(10):
        rows = read(path)
    [problem] = [row for row in rows if row.issue is not None]
    assert (problem.line, problem.issue.rule, problem.issue.field) == (3, "csv_field_too_long", "description")
    assert "'description' is over the 16 MiB per-field limit" in problem.issue.detail
    assert [row.value["title"] for row in rows if row.value is not None] == ["lamp", "table"]  # the rest is read
