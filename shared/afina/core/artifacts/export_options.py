"""``ExportOptions``: what a job (or a re-export) asks the exporter to make and where to publish it.

An afina extension of OpenAI's create-job body (``export``, sent by the ``openai`` client through
``extra_body``) and the body of ``POST /v1/models/{model}/exports``. Checked where it enters, stored
on the job, read by the exporter: the same model on both sides.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# the GGUF variants afina makes and serves; f16 is always made (conversion's output)
Variant = Literal["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
VARIANTS: tuple[str, ...] = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
LOW_BIT_VARIANTS = frozenset({"q5_k_m", "q4_k_m", "q4_0"})  # where an importance matrix helps
SERVE_PREFERENCE: tuple[str, ...] = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "bf16", "f16")
_OLLAMA_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}(:[a-z0-9][a-z0-9._-]{0,39})?")
_HUB_REPO = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")


def default_variants(parameters: int) -> tuple[str, ...]:
    """By model size: small models keep Q8_0 (Q4 costs them most); big ones get the 4- and 5-bit files."""
    if parameters < 1_000_000_000:
        return ("q8_0", "q4_k_m")
    if parameters < 10_000_000_000:
        return ("q8_0", "q5_k_m", "q4_k_m")
    return ("q6_k", "q4_k_m", "q4_0")


def _variant(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


class OllamaTarget(BaseModel):
    """Register the served variant in the operator's Ollama (``AFINA_OLLAMA_URL``)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="the Ollama model name (prefixed with the tenant's prefix); "
                                               "default: from the suffix and the job id")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _OLLAMA_NAME.fullmatch(value):
            raise ValueError("an Ollama name is lower-case letters, digits, '.', '_' or '-', optionally ':tag'")
        return value


class HubTarget(BaseModel):
    """Publish to a Hugging Face Hub repository."""

    model_config = ConfigDict(extra="forbid")

    repo: str = Field(description="'namespace/name', or 'name' in the token's own namespace")
    private: bool = True
    token_env: str | None = Field(None, description="the environment variable holding the write token "
                                                   "(one the operator allows for the tenant); default HF_TOKEN")
    variants: list[Variant] | None = Field(None, description="the GGUF files to upload; default: the served one")
    include_adapter: bool = True

    @field_validator("repo")
    @classmethod
    def _repo(cls, value: str) -> str:
        if not _HUB_REPO.fullmatch(value) or ".." in value:
            raise ValueError("a Hub repository is 'namespace/name' or 'name' (letters, digits, '.', '_', '-')")
        return value

    @field_validator("token_env")
    @classmethod
    def _token_env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError("token_env names an environment variable (upper-case letters, digits, '_')")
        return value

    @field_validator("variants", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return [_variant(item) for item in value] if isinstance(value, list) else value


class ExportOptions(BaseModel):
    """What to export: every field may be left out (the defaults are the operator's and the model size's)."""

    model_config = ConfigDict(extra="forbid", title="afina export options")

    quantizations: list[Variant] | None = Field(
        None, description="GGUF variants besides f16; default: by model size (AFINA_EXPORT_QUANTIZATIONS if set)")
    serve: Variant | None = Field(None, description="the variant the gateway serves; default: the first of "
                                                   f"{list(SERVE_PREFERENCE)} that is made")
    imatrix: bool = Field(False, description="an importance matrix from the job's training data for the "
                                             f"low-bit variants ({sorted(LOW_BIT_VARIANTS)})")
    lora_gguf: bool = Field(False, description="also a LoRA-only GGUF adapter, for Ollama's ADAPTER over a "
                                               "shared base")
    ollama: OllamaTarget | bool | None = Field(
        None, description="register in Ollama: true/an object to ask for it, false to skip; default: when "
                          "AFINA_OLLAMA_URL is set")
    hub: HubTarget | None = None

    @field_validator("quantizations", mode="before")
    @classmethod
    def _lower_all(cls, value: object) -> object:
        return [_variant(item) for item in value] if isinstance(value, list) else value

    @field_validator("serve", mode="before")
    @classmethod
    def _lower_one(cls, value: object) -> object:
        return _variant(value)

    @field_validator("quantizations")
    @classmethod
    def _no_repeats(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("lists a variant twice")
        return value

    @model_validator(mode="after")
    def _serve_is_made(self) -> ExportOptions:
        if self.serve is not None and self.quantizations is not None and self.serve != "f16" \
                and self.serve not in self.quantizations:
            raise ValueError(f"serve {self.serve!r} is not among the quantizations {self.quantizations}")
        return self

    def variants(self, parameters: int, configured: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The variants to make, f16 first: the job's, else the operator's, else the size's default."""
        chosen = self.quantizations if self.quantizations is not None else (configured or default_variants(parameters))
        return ("f16", *[name for name in chosen if name != "f16"])

    def served_variant(self, made: tuple[str, ...]) -> str:
        if self.serve is not None:
            return self.serve
        return next(name for name in SERVE_PREFERENCE if name in made)

    def wants_ollama(self, configured: bool) -> bool:
        """Register when asked, or by default when the operator configured an Ollama."""
        return configured if self.ollama is None else self.ollama is not False
