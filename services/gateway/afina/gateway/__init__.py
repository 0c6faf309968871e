"""afina gateway: the OpenAI-compatible (and later Ollama-compatible) front door."""
