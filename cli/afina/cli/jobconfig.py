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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afina.core.errors import InvalidRequest
from afina.core.training import load_job_file, parse_training_spec

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class JobRequest:
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)


def job_request(args: argparse.Namespace) -> JobRequest:
    """The job ``args`` describe: ``--config`` first, then the flags over it."""
    if args.config is not None:
        job = load_job_file(args.config)
        request = JobRequest(model=job.model, training_file=_relative(args.config.parent, job.training_file),
                             validation_file=_relative(args.config.parent, job.validation_file), suffix=job.suffix,
                             seed=job.seed, hyperparameters=job.hyperparameters.requested())
    elif args.file is None:
        raise InvalidRequest("give a training file, or a job config with --config job.yaml", param="file")
    else:
        request = JobRequest(model=DEFAULT_MODEL, training_file=args.file)
    if args.file is not None:
        request.training_file = args.file
    if args.model is not None:
        request.model = args.model
    if args.suffix is not None:
        request.suffix = args.suffix
    flags = {"n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate_multiplier": args.lr_multiplier}
    request.hyperparameters.update({name: value for name, value in flags.items() if value is not None})
    parse_training_spec(request.hyperparameters)  # the flags are checked like the file
    return request


def submit_job(client: Any, request: JobRequest) -> Any:
    """Upload local data files, then create the job (OpenAI's ``method`` form)."""
    training_file = _upload_if_local(client, request.training_file, "training_file")
    validation_file = (_upload_if_local(client, request.validation_file, "validation_file")
                       if request.validation_file else None)
    extra: dict[str, Any] = {}
    if request.seed is not None:
        extra["seed"] = request.seed
    if validation_file is not None:
        extra["validation_file"] = validation_file
    return client.fine_tuning.jobs.create(
        model=request.model, training_file=training_file, suffix=request.suffix,
        method={"type": "supervised", "supervised": {"hyperparameters": request.hyperparameters}}, **extra)


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
