"""Where a registered model was published outside afina, and how that went.

Kept on the registry row (``models.ollama``, ``models.hub``): a publication that failed leaves the
model usable in afina with the reason visible, and a retry (``POST /v1/models/{model}/exports``)
overwrites the record.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PublishStatus = Literal["registered", "failed"]


class OllamaRegistration(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="the model's name in Ollama")
    status: PublishStatus
    variant: str | None = None
    digest: str | None = Field(None, description="sha256:<hex> of the GGUF blob")
    error: str | None = None
    updated_at: int


class HubPublication(BaseModel):
    model_config = ConfigDict(extra="ignore")

    repo: str = Field(description="namespace/name")
    status: PublishStatus
    private: bool = True
    commit: str | None = None
    url: str | None = None
    files: list[str] = Field(default_factory=list)
    error: str | None = None
    updated_at: int
