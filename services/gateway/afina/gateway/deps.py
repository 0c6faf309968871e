"""Request dependencies as ``Annotated`` aliases, so a route signature reads like a sentence."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Request

from afina.core.db import repository as repo
from afina.core.errors import AuthenticationFailed, PermissionDenied
from afina.core.keys import KeyGrant, Scope
from afina.core.runtime import Runtime
from afina.gateway.middleware import RATE_STATE
from afina.gateway.serving.dispatch import Dispatcher
from afina.gateway.serving.headers import END_USER_HEADER
from afina.gateway.serving.ratelimit import KeyRateLimiter


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


def end_user(request: Request) -> str | None:
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


def current_key(runtime: RuntimeDep,
                authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> KeyGrant:
    """What the request's API key grants (a sync dependency: FastAPI runs it in a worker thread; a route
    that asks for it through several dependencies authenticates once)."""
    api_key = bearer_token(authorization)
    with runtime.db.session() as session:
        return repo.authenticate_key(session, api_key)


CallerDep = Annotated[KeyGrant, Depends(current_key)]


def current_tenant(caller: CallerDep) -> str:
    return caller.tenant_id


TenantDep = Annotated[str, Depends(current_tenant)]


def get_rate_limiter(request: Request) -> KeyRateLimiter:
    return request.app.state.rate_limiter


async def rate_limited(request: Request, caller: CallerDep,
                       limiter: Annotated[KeyRateLimiter, Depends(get_rate_limiter)]) -> None:
    """Count the request against its key's per-minute limits (429 past them); the key's state goes on
    ``request.state`` for the ``x-ratelimit-*`` headers of the answer."""
    setattr(request.state, RATE_STATE, await limiter.admit(caller))


def require(scope: Scope) -> Callable[[KeyGrant], None]:
    """A dependency refusing (403) a key without ``scope``; routers list it in ``dependencies``."""

    def check(caller: CallerDep) -> None:
        if not caller.allows(scope):
            raise PermissionDenied(f"this API key does not have the '{scope}' scope (it has: "
                                   f"{', '.join(caller.scopes)}); ask an administrator for a key that does")

    check.__name__ = f"require_{scope.replace('-', '_')}"
    return check
