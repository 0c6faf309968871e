"""The JSON schema of a job file (``FineTuningRequest``, with ``TrainingSpec`` as its hyperparameters).

``python -m afina.core.training.schema > configs/schema/training.schema.json`` regenerates the committed
file; a test fails when it is out of date. Editors validate the example configs with it
(``# yaml-language-server: $schema=...``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from afina.core.training.request import FineTuningRequest
from afina.core.training.spec import TrainingSpec

SCHEMA_ID = "https://afina.dev/schema/training.schema.json"
SPEC_REF = {"$ref": "#/$defs/TrainingSpec"}


def training_schema() -> dict[str, Any]:
    """The request's schema, its two hyperparameter places typed as ``TrainingSpec``; a file's unknown key is
    refused (``parse_job_file``), so the schema says ``additionalProperties: false``."""
    schema = FineTuningRequest.model_json_schema(ref_template="#/$defs/{model}")
    spec = TrainingSpec.model_json_schema(ref_template="#/$defs/{model}")
    defs = {**schema.pop("$defs", {}), **spec.pop("$defs", {}), "TrainingSpec": spec}
    schema["properties"]["hyperparameters"] = {**SPEC_REF, "description": "the run's hyperparameters"}
    supervised = defs["SupervisedMethod"]["properties"]
    supervised["hyperparameters"] = {**SPEC_REF, "description": "the run's hyperparameters (OpenAI's current place)"}
    schema["additionalProperties"] = False
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema, "$defs": defs}


def render() -> str:
    return json.dumps(training_schema(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
