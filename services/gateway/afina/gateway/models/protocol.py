"""Model objects as OpenAI's ``/v1/models`` returns them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from afina.core.artifacts.evaluation import QualityGate


class ModelExtension(BaseModel):
    """afina's own facts about a fine-tuned model (an extension field: OpenAI's clients keep it as extra data)."""

    quality_gate: QualityGate | None = Field(None, description="the evaluation's verdict; None until evaluated")
    blocked: bool = Field(False, description="the operator enforces the gate and it failed: the model is not "
                                             "served")


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    afina: ModelExtension | None = Field(None, description="afina's extension, on a fine-tuned model only")

    @model_serializer(mode="wrap")
    def _without_empty_extension(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("afina") is None:
            data.pop("afina", None)  # OpenAI's shape exactly, where afina has nothing to add
        return data


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    """OpenAI's answer to ``DELETE /v1/models/{model}``."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelFile(BaseModel):
    """One exported file of a model, downloadable (with HTTP range requests) at ``download_url``."""

    object: Literal["model.file"] = "model.file"
    filename: str
    kind: Literal["gguf", "lora_adapter", "modelfile", "verification"]
    variant: str | None = None
    served: bool = False
    bytes: int
    sha256: str
    download_url: str


class ModelFileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelFile]


class Publication(BaseModel):
    """Where the model was published outside afina (afina.core.artifacts.publish)."""

    ollama: dict[str, Any] | None = None
    hub: dict[str, Any] | None = None


class ModelExport(BaseModel):
    """A re-export of a registered model (``POST /v1/models/{model}/exports``): a tracked job with events."""

    id: str
    object: Literal["model.export"] = "model.export"
    model: str
    status: str
    created_at: int
    finished_at: int | None
    error: dict[str, Any] | None
    options: dict[str, Any]
    published: Publication
