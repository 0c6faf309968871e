"""Inference backends behind one interface (``base``): llama.cpp in process or one llama.cpp server per
model for afina's own GGUF files, Ollama's native API, and any OpenAI-compatible upstream."""

from __future__ import annotations

from afina.gateway.inference.base import (
    LOCAL_BACKEND,
    OLLAMA_BACKEND,
    Embeddings,
    Generation,
    GenerationRequest,
    InferenceBackend,
    LoadedModel,
    OutputFormat,
    Sampling,
    ServedModel,
    TextDelta,
    UpstreamError,
)

__all__ = ["LOCAL_BACKEND", "OLLAMA_BACKEND", "Embeddings", "Generation", "GenerationRequest", "InferenceBackend",
           "LoadedModel", "OutputFormat", "Sampling", "ServedModel", "TextDelta", "UpstreamError"]
