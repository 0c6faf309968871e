"""``/v1/chat/completions``: chat with a base model or a tenant's fine-tune, streamed or not."""
