"""The stage contracts: every manifest reads back as written, an older one (the shapes afina wrote before
``schema_version``) still reads, a newer or broken one is refused with the key and the field, and a file is
trusted only when its size and sha256 match."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest

from afina.core.artifacts import (
    AdapterManifest,
    DatasetManifest,
    ExportManifest,
    FileEntry,
    ManifestInvalid,
    ServedArtifacts,
)
from afina.core.artifacts.evaluation import EvaluationManifest, ModelEvaluation, ModelSummary
from afina.core.store.local import LocalStore

SHA = "a" * 64


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


# the shapes afina wrote before versioning (copied from what 451809c's writers produced)

OLD_DATASET = {
    "format": "openai-chat", "version": "v-0123", "source": {"filename": "treino.jsonl", "sha256": SHA,
                                                           "key": "files/acme/file-1/treino.jsonl"},
    "options": {"base_model": "smollm2-135m-instruct", "split": "auto"}, "model": "smollm2-135m-instruct",
    "pipeline_version": 3, "counts": {"rows": 40, "examples": 38, "train": 34, "validation": 4, "test": 0},
    "splits": {"train": {"key": "datasets/acme/v-0123/splits/train-aa.jsonl", "sha256": SHA, "bytes": 900,
                         "examples": 34},
               "validation": {"key": "datasets/acme/v-0123/splits/validation-bb.jsonl", "sha256": SHA,
                              "bytes": 90, "examples": 4, "encryption": "fernet-v1"}},
    "summary": {"issue_total": 2}, "artifacts": {"report": "datasets/acme/v-0123/report.jsonl"}, "created_at": 1,
}
OLD_COMBINED = {"format": "openai-chat",
                "versions": {"training": "datasets/acme/v-1", "validation": "datasets/acme/v-2"},
                "counts": {"train": 34, "validation": 4, "test": 0},
                "splits": {"train": OLD_DATASET["splits"]["train"]}, "created_at": 2}
OLD_ADAPTER = {"job_id": "ftjob-1", "base_model": "smollm2-135m-instruct", "hf_repo": "HuggingFaceTB/SmolLM2-135M",
               "chat_family": "chatml", "global_step": 12, "trained_tokens": 3400,
               "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
               "files": ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                         "tokenizer_config.json"]}
ENTRY = {"key": "models/acme/ftjob-1/model-f16.gguf", "bytes": 10, "sha256": SHA}
OLD_EXPORT = {"format": "afina.model/1", "name": "ft:smollm2:acme::ftjob-1", "job_id": "ftjob-1", "tenant_id": "acme",
              "base_model": "smollm2-135m-instruct", "family": "chatml", "serve": "q8_0",
              "adapter": "jobs/acme/ftjob-1/adapter",
              "gguf": {"f16": ENTRY, "q8_0": {**ENTRY, "key": "models/acme/ftjob-1/model-q8_0.gguf"}},
              "modelfile": {**ENTRY, "key": "models/acme/ftjob-1/Modelfile"},
              "verification": {**ENTRY, "key": "models/acme/ftjob-1/verification.json"},
              "timings": {"merge": 1.5}, "created_at": 3}
OLD_SERVED = {"gguf": {"f16": ENTRY["key"], "q8_0": "models/acme/ftjob-1/model-q8_0.gguf"}, "serve": "q8_0",
              "modelfile": "models/acme/ftjob-1/Modelfile", "manifest": "models/acme/ftjob-1/manifest.json",
              "adapter": "jobs/acme/ftjob-1/adapter"}


def test_an_older_dataset_manifest_reads() -> None:
    manifest = DatasetManifest.parse(orjson.dumps(OLD_DATASET), "old")
    assert manifest.schema_version == DatasetManifest.SCHEMA_VERSION
    assert manifest.examples("train") == 34 and manifest.examples("test") == 0
    assert manifest.splits["validation"].encryption == "fernet-v1"
    combined = DatasetManifest.parse(orjson.dumps(OLD_COMBINED), "old-combined")
    assert combined.versions is not None and combined.versions.validation == "datasets/acme/v-2"
    assert combined.source is None


def test_an_older_adapter_marker_reads_with_its_names_only() -> None:
    marker = AdapterManifest.parse(orjson.dumps(OLD_ADAPTER), "old")
    assert marker.files == () and "adapter_model.safetensors" in marker.legacy_file_names
    assert marker.lora.target_modules == ("q_proj", "v_proj") and marker.lora.alpha == 16
    assert set(marker.tokenizer_files) == {"tokenizer.json", "tokenizer_config.json"}


def test_an_older_export_manifest_and_registry_row_read() -> None:
    manifest = ExportManifest.parse(orjson.dumps(OLD_EXPORT), "old")
    assert manifest.serve == "q8_0" and manifest.gguf["q8_0"].key.endswith("q8_0.gguf")
    served = ServedArtifacts.of_row(OLD_SERVED, "ft:x")
    assert served.served_key == "models/acme/ftjob-1/model-q8_0.gguf"
    assert manifest.served("jobs/acme/ftjob-1/adapter", OLD_SERVED["manifest"]) == served


# the evaluation's shapes of schema version 1 (before the LLM judge)
OLD_TEXT = {"exact_match": 0.5, "normalized_exact_match": 0.5, "token_f1": 0.75, "rouge_l": 0.7, "bleu": 12.5,
            "chrf": 40.0}
OLD_MODEL_EVALUATION = {"schema_version": 1, "key": "fine_tuned", "kind": "hf", "title": "fine-tuned",
                        "fingerprint": SHA, "examples": 2, "loss": 0.5, "perplexity": 1.6487212707001282,
                        "scored_tokens": 6, "text": OLD_TEXT, "classification": None,
                        "answers": ["positivo", "não sei"], "example_losses": [0.25, 0.75],
                        "label_probabilities": None, "train_loss": 0.4, "train_examples": 2, "seconds": 1.5}
OLD_EVALUATION = {"schema_version": 1, "job_id": "ftjob-1", "model": "ft:x", "split": "test", "examples": 2,
                  "task": "text", "labels": None, "main_metric": "token_f1", "metrics": None, "file_id": None,
                  "models": {"fine_tuned": {"kind": "hf", "title": "fine-tuned", "loss": 0.5, "perplexity": 1.65,
                                            "scored_tokens": 6, "text": OLD_TEXT, "classification": None,
                                            "seconds": 1.5}},
                  "loss_gap": None,
                  "quality_gate": {"schema_version": 1, "passed": True, "enforced": False, "main_metric": "token_f1",
                                   "rules": {}, "checks": [], "evaluated_at": 3,
                                   "evaluation": "jobs/acme/ftjob-1/evaluation/evaluation.json"},
                  "files": {"predictions.jsonl": ENTRY}, "created_at": 3}


def test_an_evaluation_from_before_the_llm_judge_reads_as_not_judged() -> None:
    result = ModelEvaluation.parse(orjson.dumps(OLD_MODEL_EVALUATION), "old")
    assert result.schema_version == ModelEvaluation.SCHEMA_VERSION == 2
    assert result.judge is None and result.text.token_f1 == 0.75
    manifest = EvaluationManifest.parse(orjson.dumps(OLD_EVALUATION), "old")
    assert manifest.schema_version == EvaluationManifest.SCHEMA_VERSION == 2
    assert manifest.judge is None and manifest.models["fine_tuned"].judge is None
    with pytest.raises(ManifestInvalid, match="newer afina"):
        EvaluationManifest.parse(orjson.dumps({**OLD_EVALUATION, "schema_version": 3}), "new")


def test_an_evaluation_with_the_llm_judge_round_trips() -> None:
    judged = {**OLD_MODEL_EVALUATION, "schema_version": 2,
              "judge": {"identity": SHA, "scores": [5, None], "reasons": ["igual", "not graded: cut short"],
                        "mean": 5.0, "scored": 1, "unscored": 1, "error": None}}
    result = ModelEvaluation.parse(orjson.dumps(judged), "new")
    assert result.judge is not None and result.judge.scores == [5, None] and result.judge.unscored == 1
    summary = ModelSummary.of(result)
    assert summary.judge is not None and summary.judge.model_dump() == {"mean": 5.0, "scored": 1, "unscored": 1,
                                                                        "error": None}
    manifest = EvaluationManifest.parse(orjson.dumps({**OLD_EVALUATION, "schema_version": 2,
                                                      "models": {"fine_tuned": summary.model_dump(mode="json")},
                                                      "judge": {"model": "judge-x", "rubric": "r"}}), "new")
    assert manifest.judge is not None and (manifest.judge.min_score, manifest.judge.max_score) == (1, 5)
    assert EvaluationManifest.parse(manifest.to_json(), "again") == manifest


def test_a_manifest_from_a_newer_afina_is_refused() -> None:
    with pytest.raises(ManifestInvalid, match="newer afina"):
        ExportManifest.parse(orjson.dumps({**OLD_EXPORT, "schema_version": 99}), "models/acme/x/manifest.json")


@pytest.mark.parametrize(("change", "where"), [
    ({"serve": "q4_k_m"}, "serve names 'q4_k_m'"),
    ({"gguf": {"f16": {**ENTRY, "sha256": "not-a-hash"}}}, "gguf.f16.sha256"),
    ({"modelfile": None}, "modelfile"),
])
def test_a_broken_manifest_names_the_key_and_the_field(change: dict, where: str) -> None:
    with pytest.raises(ManifestInvalid) as caught:
        ExportManifest.parse(orjson.dumps({**OLD_EXPORT, **change}), "models/acme/x/manifest.json")
    assert "models/acme/x/manifest.json" in caught.value.message and where in caught.value.message


def test_a_registry_row_without_a_servable_variant_is_refused() -> None:
    with pytest.raises(ManifestInvalid, match="ft:x"):
        ServedArtifacts.of_row({**OLD_SERVED, "serve": "q4_0"}, "ft:x")
    with pytest.raises(ManifestInvalid):
        ServedArtifacts.of_row("not a dict", "ft:x")


def test_not_json_is_refused(store: LocalStore) -> None:
    store.put_bytes("datasets/acme/v-1/manifest.json", b"{not json")
    with pytest.raises(ManifestInvalid, match="not JSON"):
        DatasetManifest.read(store, "datasets/acme/v-1/manifest.json")
    assert DatasetManifest.read(store, "datasets/acme/v-2/manifest.json") is None


def test_a_manifest_round_trips_through_the_store(store: LocalStore) -> None:
    info = store.put_bytes("jobs/acme/ftjob-1/adapter/adapter_model.safetensors", b"weights")
    marker = AdapterManifest.build(job_id="ftjob-1", base_model="smollm2-135m-instruct", hf_repo="x/y",
                                   chat_family="chatml", global_step=3, trained_tokens=10,
                                   lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
                                   files=[FileEntry.of(info)])
    marker.write(store, "jobs/acme/ftjob-1/adapter/afina_adapter.json")
    again = AdapterManifest.read(store, "jobs/acme/ftjob-1/adapter/afina_adapter.json")
    assert again == marker and again.schema_version == AdapterManifest.SCHEMA_VERSION
    assert orjson.loads(store.get_bytes("jobs/acme/ftjob-1/adapter/afina_adapter.json"))["schema_version"] == 2


def test_a_file_is_trusted_only_with_the_same_size_and_sha256(store: LocalStore) -> None:
    info = store.put_bytes("models/acme/j/model-f16.gguf", b"0123456789")
    entry = FileEntry.of(info)
    assert entry.sha256 == hashlib.sha256(b"0123456789").hexdigest() and entry.matches(store)
    store.put_bytes("models/acme/j/model-f16.gguf", b"0123456780")  # same size, other bytes
    assert not entry.matches(store)
    store.delete("models/acme/j/model-f16.gguf")
    assert not entry.matches(store)


def test_an_adapter_with_a_changed_file_is_not_intact(store: LocalStore) -> None:
    prefix = "jobs/acme/ftjob-1/adapter"
    info = store.put_bytes(f"{prefix}/adapter_model.safetensors", b"weights")
    marker = AdapterManifest.build(job_id="ftjob-1", base_model="m", hf_repo="x/y", chat_family="chatml",
                                   global_step=1, trained_tokens=1, lora={"r": 4, "alpha": 8,
                                                                          "target_modules": ["q_proj"]},
                                   files=[FileEntry.of(info)])
    marker.check_intact(store, prefix)
    store.put_bytes(f"{prefix}/adapter_model.safetensors", b"weightz")
    with pytest.raises(Exception, match="adapter_model.safetensors of job ftjob-1"):
        marker.check_intact(store, prefix)
