"""Request dependencies as ``Annotated`` aliases, so a route signature reads like a sentence.

Every dependency on the inference path is ``async def``: FastAPI runs a plain ``def`` dependency in a
worker thread, and a hop there and back costs more than the work of any of these. The app's own objects
(registry, rate limiter) are read from ``request.app.state`` where they are used rather than through
dependencies of their own: each dependency FastAPI solves costs about as much as the lookup itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from afina.core.errors import AuthenticationFailed, PermissionDenied
from afina.core.keys import KeyGrant, Scope
from afina.core.runtime import Runtime
from afina.gateway.middleware import RATE_STATE
from afina.gateway.registry.cache import RegistryCache
from afina.gateway.serving.dispatch import Dispatcher
from afina.gateway.serving.headers import END_USER_HEADER
from afina.gateway.serving.ratelimit import KeyRateLimiter


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


async def end_user(request: Request) -> str | None:
    """The end user an A/B split keeps on one side (``x-afina-user``; a body's ``user`` field also works)."""
    return request.headers.get(END_USER_HEADER) or None


def bearer_token(authorization: str | None) -> str | None:
    """The key from ``Authorization: Bearer <key>``; anything else counts as no key."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("malformed Authorization header: send 'Authorization: Bearer <key>'")
    return token.strip()


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
EndUserDep = Annotated[str | None, Depends(end_user)]


async def current_key(request: Request) -> KeyGrant:
    """What the request's API key grants, from memory while the registry is unchanged (``registry.cache``); a
    route that asks for it through several dependencies authenticates once. The header is read here, not as a
    ``Header`` parameter (which the API's schema left out anyway): FastAPI's validation of one cost more per
    request than the lookup itself."""
    registry: RegistryCache = request.app.state.registry
    return await registry.grant(bearer_token(request.headers.get("authorization")))


CallerDep = Annotated[KeyGrant, Depends(current_key)]


async def current_tenant(caller: CallerDep) -> str:
    return caller.tenant_id


TenantDep = Annotated[str, Depends(current_tenant)]


async def rate_limited(request: Request, caller: CallerDep) -> None:
    """Count the request against its key's per-minute limits (429 past them); the key's state goes on
    ``request.state`` for the ``x-ratelimit-*`` headers of the answer."""
    limiter: KeyRateLimiter = request.app.state.rate_limiter
    setattr(request.state, RATE_STATE, await limiter.admit(caller))


def require(scope: Scope) -> Callable[[KeyGrant], None]:
    """A dependency refusing (403) a key without ``scope``; routers list it in ``dependencies``."""

    async def check(caller: CallerDep) -> None:
        if not caller.allows(scope):
            raise PermissionDenied(f"this API key does not have the '{scope}' scope (it has: "
                                   f"{', '.join(caller.scopes)}); ask an administrator for a key that does")

    check.__name__ = f"require_{scope.replace('-', '_')}"
    return check
