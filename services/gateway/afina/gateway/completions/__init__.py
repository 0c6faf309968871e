"""``/v1/completions``: a raw prompt continued, as OpenAI's legacy completions API."""
