"""``/v1/embeddings``: vectors of texts, as OpenAI's embeddings API."""
