"""Source rows to canonical examples: field_map, decryption, format detection, conversion.

Streams: only the first ``SAMPLE_ROWS`` records are held to detect the format (the
paired format holds an archive's member texts until it ends). The format's converter is
its entry of ``afina.ingest.formats.registry``. A record that cannot become an example is
a ``RowIssue`` (``dropped`` or ``error``); file-level notes from the readers pass through
as ``RowIssue``s too. Generic text repairs and role checks happen later, on the
``Example``s yielded here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain
from typing import Any

from afina.core.datasets.options import IngestOptions
from afina.ingest.crypto import DecryptionFailed, FernetLike, decrypt_field, load_fernet
from afina.ingest.formats.detect import SAMPLE_ROWS, detect_format
from afina.ingest.formats.registry import FORMATS_BY_NAME, Item
from afina.ingest.records import Example, RowIssue, SourceRow


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
    prompt = options.system_prompt
    for converted in FORMATS_BY_NAME[fmt].convert(prepared, options):
        if prompt and isinstance(converted, Example):
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
