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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from afina.core.errors import InvalidRequest
from afina.core.training.spec import TrainingSpec, parse_training_spec


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string (it wants ``1.0e-4``); people write learning rates the short way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
               r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


class JobFile(BaseModel):
    """A fine-tuning job: the base model, the data, and the hyperparameters."""

    model_config = ConfigDict(extra="forbid", title="afina fine-tuning job")

    model: str = Field(min_length=1, description="a catalog model id or alias, a local path, or a store:// URI")
    training_file: str = Field(min_length=1, description="a JSONL path (relative to this file) or a file id")
    validation_file: str | None = Field(None, description="a JSONL path (relative to this file) or a file id")
    suffix: str | None = Field(None, description="up to 64 letters, digits, '-' or '_', part of the model's name")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="the run's seed")
    hyperparameters: TrainingSpec = Field(default_factory=TrainingSpec)


def parse_job_file(text: str, source: str = "<config>") -> JobFile:
    """``text`` (YAML) as a ``JobFile``; an ``InvalidRequest`` naming ``source``, the line and the field."""
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
    try:
        spec = parse_training_spec(values.get("hyperparameters"))
    except InvalidRequest as problem:
        raise _located(problem.message, problem.param or "hyperparameters", document, source) from None
    try:
        job = JobFile.model_validate({key: value for key, value in values.items() if key != "hyperparameters"})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())) or "config"
        if first["type"] == "extra_forbidden":
            message = f"unknown field {param!r}; accepted: {sorted(JobFile.model_fields)}"
        elif first["type"] == "missing":
            message = f"{param} is required"
        else:
            message = f"invalid {param}: {str(first.get('msg', 'invalid value')).removeprefix('Value error, ')}"
        raise _located(message, param, document, source) from None
    return job.model_copy(update={"hyperparameters": spec})


def load_job_file(path: Path) -> JobFile:
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
