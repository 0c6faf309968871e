"""Request dependencies as ``Annotated`` aliases, so a route signature reads like a sentence.

Every dependency on the inference path is ``async def``: FastAPI runs a plain ``def`` dependency in a
worker thread, and a hop there and back costs more than the work of any of these. The app's own objects
(registry, rate limiter) are read from ``request.app.state`` where they are used rather than through
dependencies of their own: each dependency FastAPI solves costs about as much as the lookup itself. For the
same reason a route that generates or embeds has one dependency, ``InferenceCallDep``, doing all its checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from afina.core.errors import AuthenticationFailed, PermissionDenied
from afina.core.keys import KeyGrant, Scope
from afina.core.runtime import Runtime
from afina.gateway.params import refuse_nul_params
from afina.gateway.registry.cache import RegistryCache
from afina.gateway.serving.dispatch import Dispatcher
from afina.gateway.serving.headers import END_USER_HEADER
from afina.gateway.serving.ratelimit import RATE_STATE, KeyRateLimiter


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


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


def require(*scopes: Scope) -> Callable[[KeyGrant], None]:
    """A dependency refusing (403) a key with none of ``scopes``; routers list it in ``dependencies``."""

    async def check(caller: CallerDep) -> None:
        check_scope(caller, scopes)

    check.__name__ = "require_" + "_or_".join(scope.replace("-", "_") for scope in scopes)
    return check


def check_scope(caller: KeyGrant, scopes: tuple[Scope, ...], what: str | None = None) -> None:
    """``PermissionDenied`` (403) naming the scope(s) when ``caller`` has none of ``scopes``; ``what`` says what
    needs them when it is narrower than the route (a file of one purpose)."""
    if any(caller.allows(scope) for scope in scopes):
        return
    needed = " or ".join(f"'{scope}'" for scope in scopes)
    plural = "scope" if len(scopes) == 1 else "scopes"
    raise PermissionDenied(f"this API key does not have the {needed} {plural}{f' ({what})' if what else ''} (it has: "
                           f"{', '.join(caller.scopes)}); ask an administrator for a key that does")


INFERENCE_SCOPE: tuple[Scope, ...] = ("inference",)


@dataclass(frozen=True, slots=True)
class InferenceCall:
    """Everything an inference route needs about its request: who calls (``caller``, already checked for the
    ``inference`` scope and counted against its rate limits), the ``dispatcher`` that runs the call, and the end
    user an A/B split keeps on one side (``x-afina-user``; None without the header)."""

    caller: KeyGrant
    dispatcher: Dispatcher
    end_user: str | None


async def inference_call(request: Request) -> InferenceCall:
    """The one dependency of a generating or embedding route, in this order, each before the body is validated:
    a NUL in a path or query parameter (400), the key (401), its ``inference`` scope (403), and one request
    counted against its per-minute limits (429 past them; the key's state goes on ``request.state`` for the
    ``x-ratelimit-*`` headers of the answer). It was six dependencies; FastAPI's solving of each cost more than
    the work inside it, on the path every proxied request takes. ``fast_path.InferenceFastPath`` calls it too,
    for the same routes' requests it answers without FastAPI's handler."""
    await refuse_nul_params(request)
    state = request.app.state
    registry: RegistryCache = state.registry
    caller = await registry.grant(bearer_token(request.headers.get("authorization")))
    check_scope(caller, INFERENCE_SCOPE)
    limiter: KeyRateLimiter = state.rate_limiter
    setattr(request.state, RATE_STATE, await limiter.admit(caller))
    return InferenceCall(caller=caller, dispatcher=state.dispatcher,
                         end_user=request.headers.get(END_USER_HEADER) or None)


InferenceCallDep = Annotated[InferenceCall, Depends(inference_call)]
# what the request-limits middleware takes for "this route needs a key" (401 before reading the body)
AUTHENTICATING = (current_key, inference_call)
