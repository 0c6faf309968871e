"""``/api/*``: Ollama's native API over afina's models and routes, for the official ``ollama`` client."""
