"""Caps that keep one hostile or broken upload from exhausting the ingest worker.

Module constants (not settings) because they protect the worker itself, not a
user preference; tests read them to build inputs just over each cap. The caps the
gateway's upload sniff applies too (the line length, the archive caps, how much of a
file the sniffers read) live in ``afina.core.datasets.formats`` and are read from there;
the line length is re-exported here because the record caps below are sized from it.
"""

from __future__ import annotations

from afina.core.datasets.formats import MAX_LINE_BYTES, MiB

__all__ = ["MAX_CSV_FIELD_CHARS", "MAX_CSV_RECORD_CHARS", "MAX_ENCRYPTED_FILE_BYTES", "MAX_JSON_DEPTH",
           "MAX_LINE_BYTES", "MAX_TEXT_BYTES", "MiB"]

# One CSV field: as large as one JSONL record may be. Enforced by afina's own instance of the csv
# module (``csv_rows``): the process-wide ``csv.field_size_limit`` is left as it is.
MAX_CSV_FIELD_CHARS = MAX_LINE_BYTES
# One CSV record (its fields together, over all the lines a quoted field spans): bounds what the
# reader holds in memory for one row whatever the number of fields.
MAX_CSV_RECORD_CHARS = 4 * MAX_LINE_BYTES

# JSON nesting (arrays and objects inside each other): a dataset record nests a few levels
# (messages -> message -> content parts); thousands of levels are an attack on the parser and on
# every stage that walks a record. Checked while parsing, so the check costs no extra pass.
MAX_JSON_DEPTH = 64

# A TXT file (or archive member) is read whole: the text converter and the transcript
# parser need all of it. Larger text should be split or uploaded as JSONL.
MAX_TEXT_BYTES = 128 * MiB

# A whole-file Fernet token is decrypted in memory (the format has no streaming mode).
MAX_ENCRYPTED_FILE_BYTES = 256 * MiB
