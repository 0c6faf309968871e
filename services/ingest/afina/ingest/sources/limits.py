"""Caps that keep one hostile or broken upload from exhausting the ingest worker.

Module constants (not settings) because they protect the worker itself, not a
user preference; tests read them to build inputs just over each cap.
"""

from __future__ import annotations

MiB = 1024 * 1024
GiB = 1024 * MiB

# One JSONL line or CSV physical line: a record this large is a mistake (a whole
# dataset on one line, a binary blob), reported as a row error without reading it whole.
MAX_LINE_BYTES = 16 * MiB

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

# Archives: checked against the declared sizes before anything is extracted, and
# again while bytes are actually decompressed (declared sizes can lie).
MAX_ARCHIVE_MEMBERS = 10_000
MAX_ARCHIVE_TOTAL_BYTES = 4 * GiB
MAX_ARCHIVE_MEMBER_BYTES = 2 * GiB
# Text compresses 5-20x; 200x is only reached by padding, repetition or a bomb.
MAX_COMPRESSION_RATIO = 200
# The ratio cap applies only past this size: a tiny, very repetitive member is harmless.
RATIO_CHECK_MIN_BYTES = 16 * MiB

# A whole-file Fernet token is decrypted in memory (the format has no streaming mode).
MAX_ENCRYPTED_FILE_BYTES = 256 * MiB

# How much of a file the encoding and container sniffers look at.
SNIFF_BYTES = 1 * MiB
