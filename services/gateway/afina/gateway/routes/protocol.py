"""Route objects as ``/v1/routes`` answers them (an afina extension beside OpenAI's API)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from afina.core.routing import RouteSpec


class RouteObject(RouteSpec):
    object: Literal["route"] = "route"
    name: str
    created_at: int
    updated_at: int


class RouteList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RouteObject]


class RouteDeleted(BaseModel):
    name: str
    object: Literal["route"] = "route"
    deleted: bool = True
