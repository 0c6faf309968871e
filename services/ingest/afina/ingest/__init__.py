"""afina ingest: turn an uploaded training file into a validated, normalized, split dataset."""
