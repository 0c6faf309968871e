"""Which dataset format the first records are in, or a refusal that lists what was seen.

The table of formats (``afina.ingest.formats.registry``) decides: options the user gave win (a
``columns`` mapping means columns, a ``transcript`` section means a transcript), whole-text
records are a transcript when lines start with the speaker prefixes, else plain text, and
records vote by their keys (``messages``: OpenAI, ``conversations``: ShareGPT, ``instruction`` +
``output``: Alpaca, ``prompt`` + ``completion``, ``text``), the majority of the sample winning.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from afina.core.datasets.options import IngestOptions
from afina.core.errors import DatasetInvalid
from afina.ingest.formats.registry import FORMATS, Sample, record_format
from afina.ingest.records import SourceRow

SAMPLE_ROWS = 20
_MAX_KEYS_SHOWN = 30

_VOTED = [entry.spec.summary for entry in FORMATS if entry.matches is not None]
EXPECTED_SHAPES = ", ".join(_VOTED[:-1]) + f", or {_VOTED[-1]}"


def detect_format(sample: Sequence[SourceRow], options: IngestOptions | None = None) -> str:
    """The ``DatasetFormat`` of ``sample``; ``DatasetInvalid`` saying why, with the keys seen, otherwise."""
    options = options or IngestOptions()
    values = [row.value for row in sample if row.value is not None]
    source = next((row.source for row in sample), "the file")
    if not values:
        raise DatasetInvalid(f"{source}: no readable record to detect the format from", rule="unknown_format",
                             param="format")
    seen = Sample(source, records=[value for value in values if isinstance(value, dict)],
                  texts=[value for value in values if isinstance(value, str)])
    claimed = next((entry.name for entry in FORMATS if entry.claims is not None and entry.claims(seen, options)),
                   None)
    if claimed is not None:
        return claimed
    votes = Counter(shape for record in seen.records if (shape := record_format(record)) is not None)
    if votes:
        return votes.most_common(1)[0][0]
    keys = sorted({str(key) for record in seen.records for key in record})
    shown = keys[:_MAX_KEYS_SHOWN] + (["..."] if len(keys) > _MAX_KEYS_SHOWN else [])
    raise DatasetInvalid(
        f"{source}: could not detect the dataset format from the first {len(seen.records)} record(s); they have the "
        f"keys {shown}. Expected {EXPECTED_SHAPES}. For other columns set format 'columns' with user/assistant "
        f"templates (e.g. user: 'Title: {{title}}', assistant: '{{content}}'), or rename fields with 'field_map'",
        rule="unknown_format", param="format")
