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

A route may also keep what it answers (``capture``): every chat exchange, redacted, becomes a
training example, and after ``retrain_after`` new ones a fine-tuning job continues the route's
model on them. The alias never moves by itself: the new model is registered, an operator points
the route at it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from afina.core.redaction import REDACTION_KINDS, RedactionKind, check_kinds
from afina.core.training.request import NulFreeStr

ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
ROUTE_NAME_RULE = "1 to 128 letters, digits or . _ : / -, starting with a letter or digit"
# names the registry gives fine-tunes: an alias never shadows one
RESERVED_PREFIXES = ("ft:",)
# the paths under a route (``/v1/routes/{name}/captures``...): a name ending so would be shadowed by them
RESERVED_SUFFIXES = ("/captures", "/captures/content", "/retrain")


def check_route_name(name: str) -> str:
    if not ROUTE_NAME.fullmatch(name) or name.startswith(RESERVED_PREFIXES) or name.endswith(RESERVED_SUFFIXES):
        raise ValueError(f"a route name has {ROUTE_NAME_RULE}, does not start with 'ft:' and does not end with "
                         f"{', '.join(repr(suffix) for suffix in RESERVED_SUFFIXES)}")
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


MIN_RETRAIN_AFTER = 10  # ingest's default ``min_examples``: fewer captured exchanges make no dataset


class RouteCapture(BaseModel):
    """Keeping a route's chat exchanges for retraining (``afina.gateway.serving.capture``).

    Each answered chat is stored with its request messages (the route's system prompt included)
    and its answer, both redacted; feedback (thumbs up/down, a correction) is stored with it. With
    ``retrain_after``, that many exchanges not yet used by a job start one: the captured data plus
    ``training_file``, continuing from the adapter of the route's first target.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    redact: list[RedactionKind] = Field(default_factory=lambda: list(REDACTION_KINDS), max_length=16,
                                        description="personal data replaced by a placeholder before anything is "
                                                    "stored ([email], [phone], [cpf], [cnpj]); [] keeps it")
    retrain_after: Annotated[int | None, Field(ge=MIN_RETRAIN_AFTER, le=10_000_000, description="start a "
                             "fine-tuning job once this many captured exchanges no job used yet exist")] = None
    training_file: Annotated[NulFreeStr, Field(min_length=1, max_length=40)] | None = Field(
        None, description="a file of yours trained on with the captured data (default: the training file of the "
                          "job that made the first target)")
    include_feedback: Annotated[Literal["all", "positive"], Field(description="positive: leave out exchanges "
                                "thumbed down without a correction")] = "all"

    @field_validator("redact")
    @classmethod
    def _known_kinds_once(cls, kinds: list[RedactionKind]) -> list[RedactionKind]:
        return list(check_kinds(kinds))


class RouteSpec(BaseModel):
    """What an operator writes (``PUT /v1/routes/{name}``, ``afina routes set``)."""

    model_config = ConfigDict(extra="forbid")
    # 2: ``capture`` (a version 1 row has none and reads unchanged; a version 1 reader refuses a version 2 row)
    SCHEMA_VERSION: ClassVar[int] = 2

    targets: Annotated[list[RouteTarget], Field(min_length=1, max_length=16)]
    fallbacks: Annotated[list[RouteTarget], Field(max_length=8)] = Field(default_factory=list)
    system: Annotated[str | None, Field(max_length=32_768, description="added as the first message when the "
                                        "request has no system message")] = None
    options: RouteOptions = Field(default_factory=RouteOptions)
    timeout_s: Annotated[float | None, Field(gt=0, le=3600, description="a target slower than this to start "
                                             "answering gives way to the next fallback")] = None
    capture: Annotated[RouteCapture | None, Field(description="keep the route's exchanges for retraining "
                                                  "(none: nothing is kept)")] = None

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

    @property
    def captures(self) -> bool:
        """Whether exchanges of this route are kept now."""
        return self.capture is not None and self.capture.enabled

    @classmethod
    def from_row(cls, data: dict[str, Any]) -> RouteSpec:
        """A stored row of any version up to ours (a row without one is version 1); ValueError for a newer one,
        written by a newer gateway, rather than a validation error about a field this one does not know."""
        version = data.get("version", 1)
        if not isinstance(version, int) or version > cls.SCHEMA_VERSION:
            raise ValueError(f"this route was stored with schema version {version!r}; this afina reads versions "
                             f"up to {cls.SCHEMA_VERSION}: upgrade it")
        return cls.model_validate({key: value for key, value in data.items() if key != "version"})
