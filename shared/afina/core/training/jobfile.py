"""A fine-tuning job as a YAML file: what ``afina train --config job.yaml`` reads.

.. code-block:: yaml

    model: llama-3.2-1b-instruct
    training_file: data/train.jsonl      # a path next to this file, or an uploaded file id
    validation_file: data/valid.jsonl    # optional
    suffix: suporte                      # optional
    seed: 42                             # optional
    hyperparameters:                     # TrainingSpec; every field optional
      n_epochs: 3
      lora_r: 16

Everything is checked when the file is read, before anything is uploaded: a mistake is an
``InvalidRequest`` that names the file, the line and the field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from afina.core.errors import InvalidRequest
from afina.core.training.request import FineTuningRequest


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string (it wants ``1.0e-4``); people write learning rates the short way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
               r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_job_file(text: str, source: str = "<config>") -> FineTuningRequest:
    """``text`` (YAML) as a ``FineTuningRequest``; an ``InvalidRequest`` naming ``source``, the line and the field.

    A job file is the API's request body written as YAML, so it is read by the same model; unlike the
    API (which ignores what it does not know, as OpenAI's does), a file's unknown key is a typo and refused.
    """
    try:
        document = yaml.compose(text, Loader=_Loader)
        values = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise InvalidRequest(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}",
                             param="config") from None
    if not isinstance(values, dict):
        raise InvalidRequest(f"{source}: a job file is a mapping with model, training_file and hyperparameters",
                             param="config")
    unknown = sorted(str(key) for key in values if key not in FineTuningRequest.model_fields)
    if unknown:
        raise _located(f"unknown field {unknown[0]!r}; accepted: {sorted(FineTuningRequest.model_fields)}",
                       unknown[0], document, source)
    try:
        job = FineTuningRequest.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())) or "config"
        if first["type"] == "missing":
            message = f"{param} is required"
        else:
            message = f"invalid {param}: {str(first.get('msg', 'invalid value')).removeprefix('Value error, ')}"
        raise _located(message, param, document, source) from None
    try:
        job.training_spec()
    except InvalidRequest as problem:
        raise _located(problem.message, problem.param or "hyperparameters", document, source) from None
    return job


def load_job_file(path: Path) -> FineTuningRequest:
    """Read and check ``path`` (see ``parse_job_file``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}", param="config") from None
    return parse_job_file(text, str(path))


def _located(message: str, param: str, document: Any, source: str) -> InvalidRequest:
    line = _line_of(document, param.split("."))
    where = f", line {line}" if line else ""
    return InvalidRequest(f"{source}{where}: {message}", param=param)


def _line_of(node: Any, path: Sequence[str]) -> int | None:
    """The 1-based line of the key at ``path`` in a composed YAML document (the deepest one found)."""
    line = None
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == key:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line
