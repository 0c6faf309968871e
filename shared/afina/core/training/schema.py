"""The JSON schema of a job file (``JobFile``, with ``TrainingSpec`` as its hyperparameters).

``python -m afina.core.training.schema > configs/schema/training.schema.json`` regenerates the committed
file; a test fails when it is out of date. Editors validate the example configs with it
(``# yaml-language-server: $schema=...``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from afina.core.training.jobfile import JobFile

SCHEMA_ID = "https://afina.dev/schema/training.schema.json"


def training_schema() -> dict[str, Any]:
    schema = JobFile.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def render() -> str:
    return json.dumps(training_schema(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
