"""Source rows to canonical examples: field_map, decryption, format detection, conversion.

Streams: only the first ``SAMPLE_ROWS`` records are held to detect the format (the
paired format holds an archive's member texts until it ends). A record that cannot
become an example is a ``RowIssue`` (``dropped`` or ``error``); file-level notes from
the readers pass through as ``RowIssue``s too. Generic text repairs and role checks
happen later, on the ``Example``s yielded here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any

from afina.core.datasets.options import SPLIT_ALIASES, IngestOptions, PairedOptions, TranscriptOptions
from afina.core.errors import InvalidRequest
from afina.ingest.crypto import DecryptionFailed, FernetLike, decrypt_field, load_fernet
from afina.ingest.formats.base import ConversionError, as_text
from afina.ingest.formats.chat import from_alpaca, from_openai, from_prompt_completion, from_sharegpt
from afina.ingest.formats.columns import ColumnConverter
from afina.ingest.formats.detect import SAMPLE_ROWS, detect_format
from afina.ingest.formats.paired import pair_examples
from afina.ingest.formats.text import documents
from afina.ingest.formats.transcript import TranscriptParser
from afina.ingest.records import Example, RowIssue, SourceRow

Item = SourceRow | RowIssue

CHAT_CONVERTERS: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
    "openai": from_openai,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
}


def to_examples(rows: Iterable[SourceRow], options: IngestOptions) -> Iterator[Example | RowIssue]:
    """Every example of the rows (in order), with a ``RowIssue`` for each record that is not one.

    Raises ``DatasetInvalid`` when ``options.format`` is ``auto`` and the first records match
    no format (the message lists their keys), ``InvalidRequest`` when the encryption key
    variable is unset or invalid.
    """
    prepared = _prepare(rows, options)
    fmt = options.format
    if fmt == "auto":
        buffered, sample = _peek(prepared)
        if not sample:
            yield from (item for item in buffered if isinstance(item, RowIssue))
            return
        fmt = detect_format(sample, options)
        prepared = chain(buffered, prepared)
    if fmt == "paired":
        yield from _with_system_prompt(pair_examples(prepared, options.paired or PairedOptions()), options)
        return
    convert = _converter(fmt, options)
    prompt = options.system_prompt
    for item in prepared:
        if isinstance(item, RowIssue):
            yield item
            continue
        for converted in convert(item):
            if prompt and type(converted) is Example:
                _inject_system_prompt(converted, prompt)
            yield converted


def _prepare(rows: Iterable[SourceRow], options: IngestOptions) -> Iterator[Item]:
    """Rows with ``field_map`` applied and encrypted fields decrypted; issues as ``RowIssue``s."""
    decryptor = _Decryptor(options) if options.encryption and options.encryption.fields else None
    field_map = options.field_map
    for row in rows:
        if row.value is None:
            yield row.issue or RowIssue(row.source, row.line, "line", "unreadable", "error", "the record is unreadable")
            continue
        if isinstance(row.value, dict):
            if field_map:
                row.value = {field_map.get(key, key): item for key, item in row.value.items()}
            if decryptor is not None:
                failure = decryptor(row)
                if failure is not None:
                    yield failure
                    continue
        if row.issue is not None:
            yield row.issue
        yield row


def _peek(items: Iterator[Item]) -> tuple[list[Item], list[SourceRow]]:
    buffered: list[Item] = []
    sample: list[SourceRow] = []
    for item in items:
        buffered.append(item)
        if isinstance(item, SourceRow):
            sample.append(item)
            if len(sample) >= SAMPLE_ROWS:
                break
    return buffered, sample


def _converter(fmt: str, options: IngestOptions) -> Callable[[SourceRow], Iterable[Example | RowIssue]]:
    split_column = options.split.split_column
    if fmt in CHAT_CONVERTERS:
        return _records(CHAT_CONVERTERS[fmt], fmt, split_column)
    if fmt == "columns":
        if options.columns is None:
            raise InvalidRequest("format 'columns' needs a 'columns' mapping (user and assistant templates)",
                                 param="columns")
        return _records(ColumnConverter(options.columns), fmt, split_column)
    if fmt == "text":
        return lambda row: _text(row, split_column)
    if fmt == "transcript":
        parser = TranscriptParser(options.transcript or TranscriptOptions())
        return lambda row: _transcript(row, parser)
    raise ValueError(f"no converter for format {fmt!r}")  # DatasetFormat lists every format handled above


def _records(convert: Callable[[dict[str, Any]], list[dict[str, Any]]], fmt: str,
             split_column: str | None) -> Callable[[SourceRow], Iterable[Example | RowIssue]]:
    def run(row: SourceRow) -> tuple[Example | RowIssue]:
        if not isinstance(row.value, dict):
            return (_not_a_record(row, fmt),)
        try:
            messages = convert(row.value)
        except ConversionError as exc:
            return (RowIssue(row.source, row.line, exc.field, exc.rule, exc.action, exc.detail),)
        return (_example(row, split_column, messages=messages),)

    return run


def _text(row: SourceRow, split_column: str | None) -> Iterator[Example | RowIssue]:
    if isinstance(row.value, str):
        yield from documents(row.value, row.source, row.line)
        return
    assert row.value is not None
    text = as_text(row.value.get("text"))
    if text is None:
        yield RowIssue(row.source, row.line, "text", "missing_field", "error", "the record has no 'text'")
        return
    yield _example(row, split_column, text=text)


def _transcript(row: SourceRow, parser: TranscriptParser) -> Iterator[Example | RowIssue]:
    text = row.value if isinstance(row.value, str) else as_text((row.value or {}).get("text"))
    if text is None:
        yield RowIssue(row.source, row.line, "text", "missing_field", "error",
                       "a transcript record needs the chat log as text (a TXT file, or a 'text' field)")
        return
    yield from parser.parse(text, row.source, row.line)


def _example(row: SourceRow, split_column: str | None, **content: Any) -> Example:
    example = Example(row.source, row.line, **content)
    if split_column and isinstance(row.value, dict) and row.value.get(split_column) is not None:
        raw = as_text(row.value[split_column])
        if raw and raw.strip():
            example.split = SPLIT_ALIASES.get(raw.strip().lower())
            if example.split is None:
                example.issues.append(RowIssue(row.source, row.line, split_column, "unknown_split", "warning",
                                               f"unknown split name {raw.strip()!r} (use train/treino, "
                                               f"validation/validacao, test/teste); the hash split decides"))
    return example


def _not_a_record(row: SourceRow, fmt: str) -> RowIssue:
    return RowIssue(row.source, row.line, "file", "not_a_record", "error",
                    f"whole-text content cannot be read as format {fmt!r} (it needs records with fields); "
                    f"use format 'text' or 'transcript' for text files")


def _with_system_prompt(items: Iterable[Example | RowIssue], options: IngestOptions) -> Iterator[Example | RowIssue]:
    for item in items:
        if options.system_prompt and isinstance(item, Example):
            _inject_system_prompt(item, options.system_prompt)
        yield item


def _inject_system_prompt(example: Example, prompt: str) -> None:
    if example.messages is not None and not any(message.get("role") == "system" for message in example.messages):
        example.messages.insert(0, {"role": "system", "content": prompt})


class _Decryptor:
    """Decrypts the configured fields of each record in place; a failure drops the record with an error."""

    def __init__(self, options: IngestOptions) -> None:
        assert options.encryption is not None
        self.key_env = options.encryption.key_env
        self.fernet: FernetLike = load_fernet(self.key_env)
        # fields may be named as in the file or as renamed by field_map
        self.paths = [_renamed(path, options.field_map) for path in options.encryption.fields]

    def __call__(self, row: SourceRow) -> RowIssue | None:
        assert isinstance(row.value, dict)
        for path in self.paths:
            try:
                _decrypt_path(row.value, path.split("."), self.fernet)
            except DecryptionFailed as exc:
                return RowIssue(row.source, row.line, path, "decryption_failed", "error",
                                f"could not decrypt field {path!r} with the key in {self.key_env}: {exc}")
        return None


def _renamed(path: str, field_map: dict[str, str]) -> str:
    head, dot, rest = path.partition(".")
    return field_map.get(head, head) + dot + rest


def _decrypt_path(container: Any, parts: list[str], fernet: FernetLike) -> None:
    """``messages.content`` decrypts ``content`` in every message; a missing or empty field is left alone."""
    if isinstance(container, list):
        for item in container:
            _decrypt_path(item, parts, fernet)
        return
    if not isinstance(container, dict) or parts[0] not in container:
        return
    key, rest = parts[0], parts[1:]
    if rest:
        _decrypt_path(container[key], rest, fernet)
        return
    value = container[key]
    if isinstance(value, str | bytes) and value.strip():
        container[key] = decrypt_field(value, fernet)
