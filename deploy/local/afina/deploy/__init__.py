"""afina's local process runner: the embedded stack, or every service as its own process."""
