"""Every backend the gateway can reach, by the name a ``ServedModel`` gives (``local``, ``ollama``, an upstream).

Built once by ``create_app`` from the settings and closed at shutdown; nothing connects or loads
before the first call. An upstream's API key is read here from the environment variable its
configuration names, so it never sits in settings dumps, routes or logs.
"""

from __future__ import annotations

import os

from afina.core.errors import InferenceUnavailable
from afina.core.settings import Settings, UpstreamConfig
from afina.gateway.inference.base import LOCAL_BACKEND, OLLAMA_BACKEND, InferenceBackend


def _local_backend(settings: Settings) -> InferenceBackend:
    if settings.inference_backend == "llamacpp-server":
        from afina.gateway.inference.llamacpp_server import LlamaServerBackend

        return LlamaServerBackend(settings)
    from afina.gateway.inference.inprocess import InProcessBackend

    return InProcessBackend(settings)


def _upstream_backend(name: str, config: UpstreamConfig) -> InferenceBackend:
    api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
    if config.kind == "ollama":
        from afina.gateway.inference.ollama import OllamaBackend

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        return OllamaBackend(config.base_url, timeout_s=config.timeout_s, headers=headers)
    from afina.gateway.inference.openai_upstream import OpenAIUpstream

    return OpenAIUpstream(config.base_url, api_key=api_key, timeout_s=config.timeout_s, name=name)


class Backends:
    """The backends by name; the local one always, Ollama when configured, each upstream on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.local = _local_backend(settings)
        self._remote: dict[str, InferenceBackend] = {}

    @property
    def serves_from_ollama(self) -> bool:
        return self.settings.inference_backend == "ollama" and bool(self.settings.ollama_url)

    def get(self, name: str) -> InferenceBackend:
        if name == LOCAL_BACKEND:
            return self.local
        backend = self._remote.get(name)
        if backend is None:
            backend = self._open_remote(name)
            self._remote[name] = backend
        return backend

    def _open_remote(self, name: str) -> InferenceBackend:
        if name == OLLAMA_BACKEND and self.settings.ollama_url:
            return _upstream_backend(name, UpstreamConfig(kind="ollama", base_url=self.settings.ollama_url,
                                                    timeout_s=self.settings.ollama_timeout_s))
        config = self.settings.upstreams.get(name)
        if config is None:
            raise InferenceUnavailable(f"the upstream {name!r} is not configured on this gateway")
        return _upstream_backend(name, config)

    def concurrency(self, name: str) -> int:
        """How many calls one model of this backend takes at once. A local model runs one call at a time
        (a llama.cpp context, and llama_cpp.server, serve one): counting more as running would hide calls
        waiting inside the backend from the bounded queue."""
        if name == LOCAL_BACKEND:
            return 1
        config = self.settings.upstreams.get(name)
        return config.max_concurrency if config is not None else self.settings.model_max_concurrency

    def all(self) -> list[InferenceBackend]:
        return [self.local, *self._remote.values()]

    async def close(self) -> None:
        for backend in self.all():
            await backend.close()
