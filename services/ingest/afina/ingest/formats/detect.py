"""Which dataset format the first records are in, or a refusal that lists what was seen.

The keys decide: ``messages`` (OpenAI), ``conversations`` (ShareGPT), ``instruction`` +
``output`` (Alpaca), ``prompt`` + ``completion``, ``text``. Whole-text records are a
transcript when lines start with the speaker prefixes, else plain text. Options the
user gave win: a ``columns`` mapping means columns, a ``transcript`` section means a
transcript. The majority of the sample wins, so one odd first record does not decide.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from afina.core.datasets.options import IngestOptions, TranscriptOptions
from afina.core.errors import DatasetInvalid
from afina.ingest.records import SourceRow
from afina.ingest.sources.archive import PAIRED_MEMBER_KEY

SAMPLE_ROWS = 20
_MAX_KEYS_SHOWN = 30

EXPECTED_SHAPES = ("'messages' (OpenAI chat), 'conversations' (ShareGPT), 'instruction' + 'output' (Alpaca), "
                   "'prompt' + 'completion', or 'text'")


def detect_format(sample: Sequence[SourceRow], options: IngestOptions | None = None) -> str:
    """The ``DatasetFormat`` of ``sample``; ``DatasetInvalid`` saying why, with the keys seen, otherwise."""
    options = options or IngestOptions()
    values = [row.value for row in sample if row.value is not None]
    source = next((row.source for row in sample), "the file")
    if not values:
        raise DatasetInvalid(f"{source}: no readable record to detect the format from", rule="unknown_format",
                             param="format")
    records = [value for value in values if isinstance(value, dict)]
    if any(PAIRED_MEMBER_KEY in record for record in records):
        return "paired"
    if options.columns is not None and records:
        return "columns"
    texts = [value for value in values if isinstance(value, str)]
    if texts and len(texts) >= len(records):
        from afina.ingest.formats.transcript import TranscriptParser

        parser = TranscriptParser(options.transcript or TranscriptOptions())
        if options.transcript is not None or any(parser.looks_like_transcript(text) for text in texts):
            return "transcript"
        return "text"
    votes = Counter(shape for record in records if (shape := record_format(record)) is not None)
    if votes:
        return votes.most_common(1)[0][0]
    keys = sorted({str(key) for record in records for key in record})
    shown = keys[:_MAX_KEYS_SHOWN] + (["..."] if len(keys) > _MAX_KEYS_SHOWN else [])
    raise DatasetInvalid(
        f"{source}: could not detect the dataset format from the first {len(records)} record(s); they have the keys "
        f"{shown}. Expected {EXPECTED_SHAPES}. For other columns set format 'columns' with user/assistant templates "
        f"(e.g. user: 'Title: {{title}}', assistant: '{{content}}'), or rename fields with 'field_map'",
        rule="unknown_format", param="format")


def record_format(record: dict[str, Any]) -> str | None:
    """The format one record's keys say, if any."""
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None
