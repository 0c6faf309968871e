"""``/v1/files``: training files, streamed in, checked as JSONL, stored per tenant."""
