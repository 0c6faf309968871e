"""The model card: metadata the Hub reads (parsed by huggingface_hub's own card parser), exact figures, the usage."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from huggingface_hub import ModelCard

from afina.core.artifacts import AdapterManifest, LoraSettings
from afina.core.artifacts.fidelity import FidelityReport, FidelityTolerances, ReferenceFigures, VariantFidelity
from afina.core.catalog import CATALOG
from afina.exporter.model_card import render_model_card
from tests.support.hub_server import _card_metadata_errors

BASE = CATALOG["llama-3.2-1b-instruct"]
FIDELITY = {
    "prompts": 16,
    "tokens_compared": 32,
    "f16_agreement_with_merged": 0.9375,
    "variants": {
        "q8_0": {"token_agreement": 1.0, "perplexity": 7.318404912948608, "perplexity_ratio": 1.0003417263514216},
        "q4_k_m": {"token_agreement": 0.8125, "perplexity": 7.90253496170044, "perplexity_ratio": 1.08017754},
    },
}
HYPERPARAMETERS = {"n_epochs": 3, "batch_size": 8, "learning_rate": 0.0002, "max_seq_length": 2048}
MODELFILE = 'FROM ./model-q4_k_m.gguf\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER stop "<|eot_id|>"\n'


def adapter_manifest(hf_repo: str = BASE.hf_repo) -> AdapterManifest:
    lora = LoraSettings(r=16, alpha=32.0, dropout=0.05, target_modules=("k_proj", "q_proj", "v_proj"), use_rslora=True)
    return AdapterManifest.build(job_id="ftjob-abc123", base_model=BASE.id, hf_repo=hf_repo,
                                 chat_family=BASE.family.name, global_step=375, trained_tokens=1_234_567,
                                 lora=lora, files=())


def gguf_card(**overrides: object) -> str:
    arguments: dict[str, object] = dict(
        repo_id="ana/pt-assistant", base=BASE, adapter=adapter_manifest(),
        gguf_files={"q8_0": "model-q8_0.gguf", "q4_k_m": "model-q4_k_m.gguf"}, served_variant="q4_k_m",
        adapter_dir="adapter", modelfile=MODELFILE, hyperparameters=HYPERPARAMETERS, fidelity=FIDELITY,
        license_id="llama3.2", language="pt")
    arguments.update(overrides)
    return render_model_card(**arguments)  # type: ignore[arg-type]


def front_matter(card: str) -> dict[str, object]:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:card.index("\n---\n", 4)])


def test_the_hub_card_parser_reads_the_metadata() -> None:
    data = ModelCard(gguf_card()).data
    assert data.base_model == "meta-llama/Llama-3.2-1B-Instruct"
    assert data.library_name == "gguf"
    assert data.license == "llama3.2"
    assert data.pipeline_tag == "text-generation"
    assert data.language == ["pt"]
    assert data.tags == ["afina", "gguf", "lora", "llama3.2", "pt"]
    assert data.to_dict()["base_model_relation"] == "finetune"


def test_the_fidelity_figures_and_the_training_are_in_the_metadata_exactly() -> None:
    afina = front_matter(gguf_card())["afina"]
    assert afina["fidelity"] == FIDELITY  # floats round-trip unrounded through the YAML
    assert afina["training"]["steps"] == 375 and afina["training"]["trained_tokens"] == 1_234_567
    assert afina["training"]["hyperparameters"] == HYPERPARAMETERS
    assert afina["training"]["lora"]["r"] == 16 and afina["training"]["lora"]["use_rslora"] is True
    assert afina["job"] == "ftjob-abc123"


def test_the_body_shows_each_figure_unrounded() -> None:
    card = gguf_card()
    body = card[card.index("\n---\n", 4):]
    assert "| q4_k_m | 0.8125 | 7.90253496170044 | 1.08017754 |" in body
    assert "| q8_0 | 1.0 | 7.318404912948608 | 1.0003417263514216 |" in body
    assert "- **f16_agreement_with_merged**: 0.9375" in body
    assert "| learning_rate | 0.0002 |" in body and "| steps | 375 |" in body
    assert "| trained tokens | 1234567 |" in body


def test_the_body_says_how_to_run_it_with_ollama_and_llama_cpp() -> None:
    card = gguf_card()
    assert "hf download ana/pt-assistant model-q4_k_m.gguf Modelfile --local-dir pt-assistant" in card
    assert "ollama create pt-assistant -f Modelfile" in card
    assert MODELFILE.rstrip() in card
    assert "llama-server -m pt-assistant/model-q4_k_m.gguf --jinja" in card
    assert 'PeftModel.from_pretrained(base, "ana/pt-assistant", subfolder="adapter")' in card
    assert "GGUF Q4_K_M (served)" in card


def test_an_unknown_license_is_other_and_points_at_the_base_model() -> None:
    card = gguf_card(license_id=None)
    metadata = front_matter(card)
    assert (metadata["license"], metadata["license_name"]) == ("other", "base-model-license")
    assert "The license of the base model applies: see [meta-llama/Llama-3.2-1B-Instruct]" in card


def test_an_adapter_only_card_is_a_peft_adapter() -> None:
    card = gguf_card(gguf_files={}, served_variant=None, modelfile=None, language=None)
    metadata = front_matter(card)
    assert (metadata["library_name"], metadata["base_model_relation"]) == ("peft", "adapter")
    assert metadata["tags"] == ["afina", "lora", "llama3.2"] and "language" not in metadata
    assert "ollama create" not in card and "llama-server" not in card


def test_a_base_model_outside_the_hub_is_not_named_as_base_model() -> None:
    local = dataclasses.replace(BASE, hf_repo="/models/my-llama", catalog=False)
    metadata = front_matter(gguf_card(base=local, adapter=adapter_manifest(hf_repo="/models/my-llama")))
    assert "base_model" not in metadata and "base_model_relation" not in metadata


@pytest.mark.parametrize("license_id", ["llama3.2", "apache-2.0", None])
def test_the_card_passes_the_hubs_metadata_checks(license_id: str | None) -> None:
    assert _card_metadata_errors(gguf_card(license_id=license_id)) == []


def test_the_hubs_metadata_checks_refuse_an_unknown_license() -> None:
    """The check above cannot pass vacuously: the same validator refuses what the Hub refuses."""
    assert _card_metadata_errors(gguf_card(license_id="llama-3.2-community"))


def fidelity_report() -> FidelityReport:
    def variant(name: str, compared_with: str, agreement: float, perplexity: float, ratio: float) -> VariantFidelity:
        return VariantFidelity(variant=name, file=f"model-{name}.gguf", compared_with=compared_with,  # type: ignore[arg-type]
                               prompts_compared=16, agreement=agreement, mismatches=[],
                               agreement_with_reference=agreement, tokenization_matches=16,
                               tokenization_mismatches=[], perplexity=perplexity, perplexity_ratio=ratio,
                               seconds=1.5, problems=[])

    return FidelityReport(
        passed=True, prompts=16, truncated_prompts=0, texts=8, perplexity_tokens=4096,
        tolerances=FidelityTolerances(tokens=32, min_agreement=0.95, min_variant_agreement=0.0,
                                      max_perplexity_ratio=1.5),
        reference=ReferenceFigures(dtype="bfloat16", perplexity=7.316, seconds=3.0),
        variants={"f16": variant("f16", "reference", 1.0, 7.316, 1.0),
                  "q4_k_m": variant("q4_k_m", "f16", 0.8125, 7.90253496170044, 1.0801715913480103)},
        failures=[])


def test_a_fidelity_report_is_rendered_from_its_figures() -> None:
    card = gguf_card(fidelity=fidelity_report(), model_name="ft:llama-3.2-1b-instruct:acme:pt:ftjob-abc123")
    figures = front_matter(card)["afina"]["fidelity"]
    assert figures["variants"]["q4_k_m"] == {"compared_with": "f16", "agreement": 0.8125,
                                             "agreement_with_reference": 0.8125, "perplexity": 7.90253496170044,
                                             "perplexity_ratio": 1.0801715913480103}
    assert figures["tolerances"]["min_agreement"] == 0.95 and figures["passed"] is True
    assert "| q4_k_m | f16 | 0.8125 | 0.8125 | 7.90253496170044 | 1.0801715913480103 |" in card
    assert "In afina it is `ft:llama-3.2-1b-instruct:acme:pt:ftjob-abc123`, served from the Q4_K_M file." in card
