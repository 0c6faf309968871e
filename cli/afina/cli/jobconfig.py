"""``afina train``'s job: from a YAML config (``--config job.yaml``), command-line flags, or both.

The config is checked locally first (``afina.core.training.load_job_file``), so a typo is
reported with its file and line before anything is uploaded. Flags win over the config.
A ``training_file``/``validation_file`` that names a local file (relative to the config's
folder, or to the working directory for a flag) is uploaded; anything else is taken as the
id of a file already uploaded.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from afina.core.errors import InvalidRequest
from afina.core.training import FineTuningRequest, load_job_file

DEFAULT_MODEL = "smollm2-135m-instruct"


def job_request(args: argparse.Namespace) -> FineTuningRequest:
    """The job ``args`` describe: ``--config`` first, then the flags over it, checked as the API checks it."""
    if args.config is not None:
        job = load_job_file(args.config)
        values = job.model_dump(exclude_none=True)
        values["training_file"] = _relative(args.config.parent, job.training_file)
        values["validation_file"] = _relative(args.config.parent, job.validation_file)
    elif args.file is None:
        raise InvalidRequest("give a training file, or a job config with --config job.yaml", param="file")
    else:
        values = {"model": DEFAULT_MODEL, "training_file": args.file}
    if args.file is not None:
        values["training_file"] = args.file
    if args.model is not None:
        values["model"] = args.model
    if args.suffix is not None:
        values["suffix"] = args.suffix
    flags = {"n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate_multiplier": args.lr_multiplier}
    chosen = {name: value for name, value in flags.items() if value is not None}
    if chosen:  # the flags win over the file: they replace its value wherever the file put it
        spec = FineTuningRequest.model_validate(values).training_spec().requested()
        values.pop("method", None)
        values["hyperparameters"] = {**spec, **chosen}
    try:
        request = FineTuningRequest.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())) or "config"
        raise InvalidRequest(f"invalid {param}: {str(first.get('msg')).removeprefix('Value error, ')}",
                             param=param) from None
    request.training_spec()  # the flags are checked like the file
    return request


def submit_job(client: Any, request: FineTuningRequest) -> Any:
    """Upload local data files, then create the job (OpenAI's ``method`` form)."""
    training_file = _upload_if_local(client, request.training_file, "training_file")
    validation_file = (_upload_if_local(client, request.validation_file, "validation_file")
                       if request.validation_file else None)
    extra: dict[str, Any] = {}
    if request.seed is not None:
        extra["seed"] = request.seed
    if validation_file is not None:
        extra["validation_file"] = validation_file
    if request.metadata is not None:
        extra["metadata"] = request.metadata
    hyperparameters = request.training_spec().requested()
    return client.fine_tuning.jobs.create(
        model=request.model, training_file=training_file, suffix=request.suffix,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}, **extra)


def _relative(base_dir: Path, reference: str | None) -> str | None:
    """A config's data path, read from the config's folder; a file id stays as it is."""
    if reference is None:
        return None
    return os.path.normpath(base_dir / reference) if (base_dir / reference).is_file() else reference


def _upload_if_local(client: Any, reference: str, param: str) -> str:
    path = Path(reference)
    if not path.is_file():
        if reference.startswith("file-"):
            return reference
        raise InvalidRequest(f"{param} {reference!r} is neither a file on this machine nor an uploaded file id "
                             f"(file-…)", param=param)
    with path.open("rb") as handle:
        return client.files.create(file=handle, purpose="fine-tune").id
