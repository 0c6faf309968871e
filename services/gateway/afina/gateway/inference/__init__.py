"""Inference backends: llama.cpp in process, or one llama.cpp server per model, chosen by settings."""

from __future__ import annotations

from afina.core.settings import Settings
from afina.gateway.inference.base import ChatRequest, InferenceBackend

__all__ = ["ChatRequest", "InferenceBackend", "open_backend"]


def open_backend(settings: Settings) -> InferenceBackend:
    """The backend ``settings.inference_backend`` names; nothing is loaded or started until first use."""
    if settings.inference_backend == "llamacpp-server":
        from afina.gateway.inference.llamacpp_server import LlamaServerBackend

        return LlamaServerBackend(settings)
    from afina.gateway.inference.inprocess import InProcessBackend

    return InProcessBackend(settings)
