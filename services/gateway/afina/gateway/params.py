"""Input rules every route shares: no NUL character in a text parameter.

PostgreSQL's text columns cannot hold U+0000, so an id, name or filter with one made the
registry query raise and the request answer 500. No afina id or model name contains it,
so such a value is refused up front with a 400 naming the parameter. Path and query
parameters are checked by ``refuse_nul_params`` (a router dependency); body fields that
reach the registry use ``NulFreeStr``; a service that reads a value no router checked (a
form field) calls ``check_no_nul``.
"""

from __future__ import annotations

from fastapi import Request
from starlette.convertors import CONVERTOR_TYPES, PathConvertor

from afina.core.errors import InvalidRequest
from afina.core.training.request import NUL, NUL_MESSAGE, NulFreeStr

__all__ = ["MODEL_NAME_PATH", "NUL", "NUL_MESSAGE", "NulFreeStr", "check_no_nul", "refuse_nul_params"]


class _AnyTextPath(PathConvertor):
    """Starlette's ``path`` (``.*``) stops at a newline, while a plain ``{param}`` (``[^/]+``) takes one: a
    model name holding a decoded ``%0A`` then matched only ``DELETE /v1/models/{model}`` and a GET of it
    answered 405. This one takes every character, so such a name reaches the lookup and answers 404."""

    regex = r"[\s\S]*"


# registered once under its own name (Starlette's table of convertors is process-wide, keyed by name)
MODEL_NAME_PATH = "afina_any_text"
CONVERTOR_TYPES.setdefault(MODEL_NAME_PATH, _AnyTextPath())


def check_no_nul(name: str, value: str | None) -> None:
    """A 400 naming ``name`` when ``value`` holds NUL (for values no router dependency saw)."""
    if value is not None and NUL in value:
        raise InvalidRequest(f"Invalid '{name}': {NUL_MESSAGE}.", param=name)


async def refuse_nul_params(request: Request) -> None:
    """Refuse a path or query parameter holding NUL before any route logic runs (a router dependency)."""
    for name, value in request.path_params.items():
        if isinstance(value, str):
            check_no_nul(name, value)
    if request.scope.get("query_string"):  # parsing an empty one cost as much as the rest of this check
        for name, value in request.query_params.multi_items():
            check_no_nul(name, value)
