"""``FidelityReport``: how closely each exported GGUF answers like the model that was trained.

The exporter's fidelity gate writes it (into ``verification.json`` under ``"fidelity"``, the file
``ExportVerification`` reads and writes); the job's report, the export manifest's readers and the Hub
model card read it. Every figure is kept exactly
as measured, so a reader can see by how much a variant passed or failed, not only that it did.

The reference is the merged transformers model (the trained weights, in the dtype they were saved
in). The 16-bit GGUF is compared with the reference; each quantized variant with the 16-bit GGUF.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from afina.core.artifacts.manifest import FileEntry, Manifest, ManifestInvalid
from afina.core.errors import ObjectMissing
from afina.core.store import ArtifactStore

FIDELITY_SCHEMA_VERSION = 1
VERIFICATION_FILE = "verification.json"


class FidelityTolerances(BaseModel):
    """The limits the gate applied (the operator's settings at export time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(ge=1, description="greedy tokens compared per prompt")
    min_agreement: float = Field(ge=0.0, le=1.0, description="least share of prompts on which the f16 GGUF "
                                                             "must give the reference's tokens")
    min_variant_agreement: float = Field(ge=0.0, le=1.0, description="least share of prompts on which a "
                                                                     "quantized GGUF must give f16's tokens")
    max_perplexity_ratio: float = Field(gt=0.0, description="most a quantized GGUF's perplexity may be, as a "
                                                            "multiple of f16's")
    near_tie_margin: float = Field(0.0, ge=0.0, description="a prompt that first differs where the compared-with "
                                                            "side's top token led the token taken by at most this "
                                                            "many logits still counts as agreeing (0: exact ties "
                                                            "only)")
    min_disagreements: int = Field(1, ge=1, description="the fewest disagreeing prompts (near ties not counted) "
                                                        "that can fail an agreement limit: below it a share under "
                                                        "the limit is reported as a warning, since on a handful of "
                                                        "prompts one stray divergence is all the share measures "
                                                        "(1: the share alone decides, as before this field)")


class PromptMismatch(BaseModel):
    """A prompt whose greedy tokens differ: where they first differ and the two tokens there.

    A token is None where that side had already stopped (end of turn) before ``position``. ``expected_margin``
    is how many logits the compared-with side's token led its runner-up there: a difference of 2e-5 logits
    is a tie that no 16-bit copy can be expected to break the same way; ``near_tie`` says the token taken
    was that runner-up within ``near_tie_margin``, and the prompt is not counted against the agreement limit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: int = Field(ge=0, description="index in the held-out prompts")
    position: int = Field(ge=0, description="first differing position among the generated tokens")
    expected: int | None = Field(description="the compared-with side's token id there")
    actual: int | None = Field(description="this variant's token id there")
    expected_margin: float | None = Field(None, description="the compared-with side's logit lead of its token "
                                                            "over its runner-up at that position")
    near_tie: bool = False


class ReferenceFigures(BaseModel):
    """The merged transformers model's own figures on the same token ids."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str = Field(description="the dtype the merged model was run in (as saved)")
    perplexity: float | None = Field(description="on the validation texts; None without texts")
    seconds: float


class VariantFidelity(BaseModel):
    """One GGUF variant's figures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str
    file: str
    compared_with: Literal["reference", "f16"]
    prompts_compared: int = Field(ge=0)
    agreement: float = Field(ge=0.0, le=1.0, description="share of prompts whose greedy tokens equal "
                                                         "compared_with's exactly")
    near_ties: int = Field(0, ge=0, description="differing prompts that first differ at a near tie (counted as "
                                                "agreeing by the limit)")
    mismatches: list[PromptMismatch] = Field(description="every prompt whose tokens differ, near ties included")
    agreement_with_reference: float = Field(ge=0.0, le=1.0, description="the same share against the merged "
                                                                        "transformers model")
    tokenization_matches: int = Field(ge=0, description="prompts on which llama.cpp's own tokenization of the "
                                                        "rendered prompt equals the trained tokenizer's ids")
    tokenization_mismatches: list[int] = Field(description="indices of the prompts where it does not")
    perplexity: float | None = Field(description="on the validation texts; None without texts")
    perplexity_ratio: float | None = Field(description="perplexity / f16's perplexity (1.0 for f16)")
    seconds: float
    problems: list[str] = Field(description="the limits this variant broke; empty when it passed")

    @property
    def passed(self) -> bool:
        return not self.problems


class FidelityReport(BaseModel):
    """The fidelity gate's figures for every variant of one export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = FIDELITY_SCHEMA_VERSION
    passed: bool
    tolerances: FidelityTolerances
    prompts: int = Field(ge=0, description="held-out prompts compared")
    truncated_prompts: int = Field(ge=0, description="prompts cut to their last max_prompt_tokens tokens")
    texts: int = Field(ge=0, description="validation texts in the perplexity")
    perplexity_tokens: int = Field(ge=0, description="tokens predicted in the perplexity (over all texts)")
    reference: ReferenceFigures
    variants: dict[str, VariantFidelity] = Field(description="variant -> its figures, f16 first")
    failures: list[str] = Field(description="every broken limit, each naming the variant, the figure and the "
                                            "limit")
    warnings: list[str] = Field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per variant, the headline figures (for a model card or an event)."""
        return {name: {"agreement": figures.agreement, "agreement_with_reference": figures.agreement_with_reference,
                       "perplexity": figures.perplexity, "perplexity_ratio": figures.perplexity_ratio}
                for name, figures in self.variants.items()}


class ExportVerification(Manifest):
    """``verification.json``: one export's GGUF checks (``checks``: variant -> template, EOS, tokens, greedy answer)
    and its fidelity gate's report (None when the job had no held-out prompt), with the phase timings.

    The exporter writes it with the manifest (and alone, with ``passed`` false, when a check or the gate failed);
    its readers take it through ``of_entry`` from the ``ExportManifest``'s entry, so a file that changed after
    the export is refused rather than quoted.
    """

    KIND: ClassVar[str] = "verification"
    SCHEMA_VERSION: ClassVar[int] = 1

    passed: bool
    family: str | None = None
    stock_template_sha256: str | None = None
    eos_token: str | None = None
    completion_probe: list[dict[str, Any]] = Field(default_factory=list)
    checks: dict[str, dict[str, Any]] = Field(default_factory=dict, description="variant -> its GGUF checks")
    fidelity: FidelityReport | None = None
    timings: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def of_entry(cls, store: ArtifactStore, entry: FileEntry) -> ExportVerification:
        """The report an ``ExportManifest`` lists, checked against its recorded size and sha256."""
        import hashlib

        try:
            raw = store.get_bytes(entry.key)
        except ObjectMissing:
            raise ManifestInvalid(f"{cls.KIND} report {entry.key} is missing; export the model again") from None
        if len(raw) != entry.bytes or hashlib.sha256(raw).hexdigest() != entry.sha256:
            raise ManifestInvalid(f"{cls.KIND} report {entry.key} changed after the export listed it; export the "
                                  "model again")
        return cls.parse(raw, entry.key)
