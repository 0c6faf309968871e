"""Dataset formats: detect which one the records are in and convert them to canonical examples.

``to_examples(open_rows(...), options)`` is the whole front half of ingest; see
``convert`` for the order of steps and ``detect`` for how the format is told.
"""

from afina.ingest.formats.convert import to_examples
from afina.ingest.formats.detect import detect_format

__all__ = ["detect_format", "to_examples"]
