"""What each stage commits and the next one reads: typed, versioned manifests.

One module per contract, one writer per manifest, every reader through these models:

- ``dataset``: ``DatasetManifest``, written last by ingest under a dataset version (or a job's
  combination of two versions); read by the trainer, the gateway's file endpoints and the CLI.
- ``adapter``: ``AdapterManifest``, the trainer's commit marker next to the LoRA adapter; read by the
  exporter (which merges nothing without it) and by a job that continues from another's adapter.
- ``export``: ``ExportManifest`` (every exported file with its size and sha256, the served variant,
  the Modelfile), written last by the exporter; ``ServedArtifacts``, the registry row's pointer to
  what the gateway serves.
- ``export_options``: ``ExportOptions``, what a job or a re-export asks the exporter for (variants, the
  served one, Ollama, the Hub); ``publish``: what the registry row records of each publication.
- ``evaluation``: ``ModelEvaluation`` (one model's figures, written as it finishes: the resume point),
  ``EvaluationManifest`` (``evaluation.json``, written last by the evaluator) and ``QualityGate`` (the
  verdict the models row keeps, shown by ``/v1/models/{id}`` and enforced by serving when asked).

Each manifest carries ``schema_version``; a reader upgrades an older one in ``_upgrade`` and refuses
a newer one with a message, so a rolling upgrade never misreads a file.
"""

from afina.core.artifacts.adapter import ADAPTER_MARKER, AdapterManifest, LoraSettings
from afina.core.artifacts.dataset import DATASET_MANIFEST, DatasetManifest, DatasetSource, SplitFile
from afina.core.artifacts.evaluation import EVALUATION_MANIFEST, EvaluationManifest, ModelEvaluation, QualityGate
from afina.core.artifacts.export import EXPORT_MANIFEST, ExportManifest, ServedArtifacts
from afina.core.artifacts.export_options import ExportOptions, HubTarget, OllamaTarget
from afina.core.artifacts.manifest import FileEntry, Manifest, ManifestInvalid
from afina.core.artifacts.publish import HubPublication, OllamaRegistration

__all__ = [
    "ADAPTER_MARKER", "DATASET_MANIFEST", "EVALUATION_MANIFEST", "EXPORT_MANIFEST", "AdapterManifest",
    "DatasetManifest", "DatasetSource", "EvaluationManifest", "ExportManifest", "ExportOptions", "FileEntry",
    "HubPublication", "HubTarget", "LoraSettings", "Manifest", "ManifestInvalid", "ModelEvaluation",
    "OllamaRegistration", "OllamaTarget", "QualityGate", "ServedArtifacts", "SplitFile",
]
