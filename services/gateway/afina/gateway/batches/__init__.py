"""``/v1/batches``: OpenAI's Batch API, run by a worker on the gateway's own serving stack."""
