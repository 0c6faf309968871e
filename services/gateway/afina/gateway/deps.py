"""Request dependencies as ``Annotated`` aliases, so a route signature reads like a sentence."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from afina.core.db import repository as repo
from afina.core.errors import AuthenticationFailed
from afina.core.runtime import Runtime
from afina.gateway.serving.dispatch import Dispatcher
from afina.gateway.serving.headers import END_USER_HEADER


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


def current_tenant(runtime: RuntimeDep,
                   authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> str:
    """The tenant owning the request's API key (a sync dependency: FastAPI runs it in a worker thread)."""
    api_key = bearer_token(authorization)
    with runtime.db.session() as session:
        return repo.authenticate(session, api_key)


TenantDep = Annotated[str, Depends(current_tenant)]
