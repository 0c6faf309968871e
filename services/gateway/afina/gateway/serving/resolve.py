"""Which models a public name means, and what each is to a backend.

A name is a catalog base model, one of the tenant's fine-tunes, or one of its routes. A route
gives its targets in the order they are tried: the one its weighted split picks for this end
user (the same user always lands on the same side of an A/B split while the weights stay), then
its fallbacks. A target becomes a ``ServedModel`` only when it is tried, so a fallback costs
nothing (no download, no load) while the first target answers.

Another tenant's model or route is indistinguishable from a missing one (404 ``model_not_found``).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from anyio import to_thread

from afina.core.artifacts import ManifestInvalid, ServedArtifacts
from afina.core.artifacts.evaluation import refuse_blocked
from afina.core.artifacts.publish import OllamaRegistration
from afina.core.catalog import catalog_model
from afina.core.catalog.gguf_metadata import gguf_metadata
from afina.core.errors import InferenceUnavailable, InvalidRequest, NotFound
from afina.core.routing import RouteCapture, RouteOptions, RouteSpec, RouteTarget
from afina.core.runtime import Runtime
from afina.gateway.inference.base import LOCAL_BACKEND, OLLAMA_BACKEND, ServedModel
from afina.gateway.inference.files import ModelFileCache
from afina.gateway.registry.cache import RegistryCache

OLLAMA_DEFAULT_TAG = ":latest"


def model_not_found(name: str) -> NotFound:
    return NotFound(f"The model '{name}' does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


@dataclass(frozen=True)
class Plan:
    """What answering one request for ``requested`` may involve, in the order to try."""

    requested: str
    candidates: list[RouteTarget]
    route: str | None = None
    system: str | None = None
    defaults: RouteOptions = field(default_factory=RouteOptions)
    timeout_s: float | None = None
    capture: RouteCapture | None = None  # a route keeping its exchanges for retraining: how (``serving.capture``)


def pick_target(route_name: str, targets: list[RouteTarget], user: str | None) -> RouteTarget:
    """A target by weight: by a hash of (route, user) when the end user is known, so they stay on their
    side of the split; at random otherwise."""
    weighted = [target for target in targets if target.weight > 0]
    total = sum(target.weight for target in weighted)
    if user:
        digest = hashlib.sha256(f"{route_name}\0{user}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64 * total
    else:
        point = random.random() * total  # noqa: S311 - traffic splitting, not security
    for target in weighted:
        point -= target.weight
        if point < 0:
            return target
    return weighted[-1]


def plan_for_route(name: str, spec: RouteSpec, user: str | None) -> Plan:
    chosen = pick_target(name, spec.targets, user)
    fallbacks = [target for target in spec.fallbacks if target.label != chosen.label]
    return Plan(requested=name, candidates=[chosen, *fallbacks], route=name, system=spec.system,
                defaults=spec.options, timeout_s=spec.timeout_s, capture=spec.capture if spec.captures else None)


@lru_cache(maxsize=256)
def _context_length(path: Path, mtime_ns: int) -> int | None:
    """The context length a GGUF was trained for (``<arch>.context_length``), read once per file version."""
    try:
        metadata = gguf_metadata(path)
    except InvalidRequest:
        return None
    value = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    return int(value) if isinstance(value, int) else None


def local_model(name: str, path: Path) -> ServedModel:
    stat = path.stat()
    return ServedModel(name=name, backend=LOCAL_BACKEND, path=path, size=stat.st_size,
                       context_length=_context_length(path, stat.st_mtime_ns))


class Resolver:
    """Names to plans, and targets to served models, for one gateway. The registry's rows come from memory
    while current (``registry.cache``); only work that may block (a GGUF's file, downloaded if missing) goes
    to a worker thread."""

    def __init__(self, runtime: Runtime, files: ModelFileCache, registry: RegistryCache, *,
                 serve_from_ollama: bool) -> None:
        self.runtime = runtime
        self.files = files
        self.registry = registry
        self.serve_from_ollama = serve_from_ollama

    async def plan(self, tenant_id: str, name: str, user: str | None = None) -> Plan:
        for candidate in _spellings(name):
            if catalog_model(candidate) is not None:
                return Plan(requested=name, candidates=[RouteTarget(model=candidate)])
            entry = await self.registry.name(tenant_id, candidate)
            if entry.model is not None:
                return Plan(requested=name, candidates=[RouteTarget(model=candidate)])
            if entry.route is not None:
                return plan_for_route(candidate, entry.route, user)
        raise model_not_found(name)

    @staticmethod
    @lru_cache(maxsize=64)
    def _catalog_gguf(model_id: str) -> Path:
        """A catalog model's GGUF, located once (finding it inside its package takes the import lock)."""
        spec = catalog_model(model_id)
        assert spec is not None
        return spec.gguf_path()

    async def served(self, tenant_id: str, target: RouteTarget) -> ServedModel:
        """What runs ``target`` (downloading a fine-tune's GGUF into the local cache if it is served here)."""
        if target.upstream is not None:
            if target.upstream not in self.runtime.settings.upstreams:
                raise InferenceUnavailable(f"the upstream {target.upstream!r} is not configured on this gateway")
            return ServedModel(name=target.label, backend=target.upstream, upstream_model=target.model)
        spec = catalog_model(target.model)
        if spec is not None:
            return await to_thread.run_sync(self._catalog_served, spec.id)
        entry = (await self.registry.name(tenant_id, target.model)).model
        if entry is None:
            raise model_not_found(target.model)
        refuse_blocked(entry.name, entry.quality_gate)  # a failed quality gate the operator enforces: not served
        if self.serve_from_ollama and entry.ollama:
            registration = OllamaRegistration.model_validate(entry.ollama)
            if registration.status == "registered":
                return ServedModel(name=entry.name, backend=OLLAMA_BACKEND, upstream_model=registration.name)
        try:
            key = ServedArtifacts.of_row(entry.artifacts, entry.name).served_key
        except ManifestInvalid:
            raise InferenceUnavailable(f"model {entry.name} has no servable GGUF registered") from None
        return await to_thread.run_sync(lambda: local_model(entry.name, self.files.fetch(key)))

    def _catalog_served(self, model_id: str) -> ServedModel:
        try:
            return local_model(model_id, self._catalog_gguf(model_id))
        except NotFound:  # trainable here, not servable: the caller's 404, a route's cue to fall back
            raise NotFound(f"The base model '{model_id}' has no weights this server can serve (fine-tunes of it "
                           "can be served).", param="model", code="model_not_found") from None


def _spellings(name: str) -> list[str]:
    """The name as given and, for Ollama clients that add the default tag, without ``:latest``."""
    if name.endswith(OLLAMA_DEFAULT_TAG) and len(name) > len(OLLAMA_DEFAULT_TAG):
        return [name, name.removesuffix(OLLAMA_DEFAULT_TAG)]
    return [name]
