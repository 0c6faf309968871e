"""Routes: a public model name (an alias) that the gateway resolves to one of several models.

A route is what an app names instead of a model (``aeon-custom``): its ``targets`` share the
traffic by weight (an A/B split, sticky per end user), its ``fallbacks`` answer, in order, when
the chosen target is down, slow or overloaded (a cloud model first, the local fine-tune after,
as ``seeds/003_*`` does), and its defaults (a system prompt, sampling options) apply where the
request sets none. Routes live in the registry (``routes`` table), one row per tenant and name,
so moving an alias to a new model is one write that the next request reads.

A target names a model afina serves (a fine-tune or a catalog base model) or, with
``upstream``, a model of an OpenAI-compatible or Ollama upstream the operator configured
(``settings.upstreams``: their addresses and keys stay with the operator, never in a route).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
ROUTE_NAME_RULE = "1 to 128 letters, digits or . _ : / -, starting with a letter or digit"
# names the registry gives fine-tunes: an alias never shadows one
RESERVED_PREFIXES = ("ft:",)


def check_route_name(name: str) -> str:
    if not ROUTE_NAME.fullmatch(name) or name.startswith(RESERVED_PREFIXES):
        raise ValueError(f"a route name has {ROUTE_NAME_RULE}, and does not start with 'ft:'")
    return name


class RouteTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=512, description="a model of this tenant, a catalog "
                                "base model, or with `upstream` the model's id at that upstream")]
    upstream: Annotated[str | None, Field(max_length=64, description="an upstream the operator configured "
                                          "(AFINA_UPSTREAMS); none: a model afina serves")] = None
    weight: Annotated[float, Field(ge=0, le=1_000_000, description="share of the traffic among the targets")] = 1.0

    @property
    def label(self) -> str:
        """How the target is named in headers, metrics and logs."""
        return f"{self.upstream}/{self.model}" if self.upstream else self.model


class RouteOptions(BaseModel):
    """Sampling defaults of a route (a request's own values win)."""

    model_config = ConfigDict(extra="forbid")

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: Annotated[list[str], Field(max_length=8)] | None = None
    seed: int | None = None
    repeat_penalty: Annotated[float, Field(ge=0)] | None = None


class RouteSpec(BaseModel):
    """What an operator writes (``PUT /v1/routes/{name}``, ``afina routes set``)."""

    model_config = ConfigDict(extra="forbid")
    SCHEMA_VERSION: ClassVar[int] = 1

    targets: Annotated[list[RouteTarget], Field(min_length=1, max_length=16)]
    fallbacks: Annotated[list[RouteTarget], Field(max_length=8)] = Field(default_factory=list)
    system: Annotated[str | None, Field(max_length=32_768, description="added as the first message when the "
                                        "request has no system message")] = None
    options: RouteOptions = Field(default_factory=RouteOptions)
    timeout_s: Annotated[float | None, Field(gt=0, le=3600, description="a target slower than this to start "
                                             "answering gives way to the next fallback")] = None

    @field_validator("targets")
    @classmethod
    def _some_weight(cls, targets: list[RouteTarget]) -> list[RouteTarget]:
        if not any(target.weight > 0 for target in targets):
            raise ValueError("at least one target needs a weight above 0")
        return targets

    @model_validator(mode="after")
    def _no_duplicate_targets(self) -> RouteSpec:
        labels = [target.label for target in self.targets]
        if len(set(labels)) != len(labels):
            raise ValueError("a model is listed twice among the targets")
        return self

    def to_row(self) -> dict[str, Any]:
        return {"version": self.SCHEMA_VERSION, **self.model_dump(mode="json")}

    @classmethod
    def from_row(cls, data: dict[str, Any]) -> RouteSpec:
        return cls.model_validate({key: value for key, value in data.items() if key != "version"})
