"""The gateway's serving stack (backends, registry, resolver, dispatcher), built once per process.

The HTTP app and the batch worker build the same stack, so a batch's requests are answered by the same
models, routes, backends and observers as the same requests sent one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

from afina.core.runtime import Runtime
from afina.gateway.inference.files import ModelFileCache
from afina.gateway.registry.cache import RegistryCache
from afina.gateway.registry.generation import open_generation_reader
from afina.gateway.serving.backends import Backends
from afina.gateway.serving.capture import CaptureObserver
from afina.gateway.serving.dispatch import Dispatcher
from afina.gateway.serving.limiter import ModelLimiter
from afina.gateway.serving.observers import TokenMeter, access_log, record_metrics
from afina.gateway.serving.ratelimit import KeyRateLimiter, open_rate_limiter
from afina.gateway.serving.resolve import Resolver


@dataclass
class ServingStack:
    backends: Backends
    registry: RegistryCache
    rate_limiter: KeyRateLimiter
    dispatcher: Dispatcher

    async def close(self) -> None:
        await self.backends.close()
        await self.rate_limiter.close()
        await self.registry.close()


def build_serving(runtime: Runtime) -> ServingStack:
    settings = runtime.settings
    backends = Backends(settings)
    registry = RegistryCache(lambda: runtime.db, open_generation_reader(settings.resolved_database_url))
    resolver = Resolver(runtime, ModelFileCache(runtime), registry, serve_from_ollama=backends.serves_from_ollama)
    rate_limiter = open_rate_limiter(settings)
    dispatcher = Dispatcher(resolver, backends, ModelLimiter(max_queue=settings.model_max_queue,
                                                             queue_timeout_s=settings.model_queue_timeout_s,
                                                             max_wait_s=settings.model_max_queue_wait_s),
                            observers=[TokenMeter(rate_limiter), record_metrics, access_log, CaptureObserver(runtime)],
                            cooldown_s=settings.upstream_cooldown_s)
    return ServingStack(backends=backends, registry=registry, rate_limiter=rate_limiter, dispatcher=dispatcher)
