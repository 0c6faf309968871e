"""``afina train``'s request: the YAML file and the flags become the API's own ``FineTuningRequest``, checked the
same way (a bad suffix in a file is refused here, as the API refuses it), the flags win over the file wherever
the file put the value, and a file's data path is read from the file's folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from afina.cli.jobconfig import job_request
from afina.core.errors import InvalidRequest


def args(config: Path | None = None, **flags: object) -> argparse.Namespace:
    values = {"config": config, "file": None, "model": None, "suffix": None, "epochs": None, "batch_size": None,
              "lr_multiplier": None, **flags}
    return argparse.Namespace(**values)


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "treino.jsonl").write_text("{}\n")
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_the_file_and_the_flags_make_one_request(tmp_path: Path) -> None:
    config = write(tmp_path, "model: smollm2-135m-instruct\ntraining_file: data/treino.jsonl\nsuffix: suporte\n"
                             "method:\n  type: supervised\n  supervised:\n    hyperparameters:\n"
                             "      n_epochs: 2\n      lora_r: 8\n")
    request = job_request(args(config, epochs=4, suffix="outro"))
    assert request.training_file == str(tmp_path / "data" / "treino.jsonl")
    assert request.suffix == "outro"
    assert request.training_spec().requested() == {"n_epochs": 4, "lora_r": 8}  # the flag over the file's method


def test_a_file_is_checked_like_the_api_body(tmp_path: Path) -> None:
    config = write(tmp_path, "model: smollm2-135m-instruct\ntraining_file: data/treino.jsonl\nsuffix: 'a b'\n")
    with pytest.raises(InvalidRequest) as caught:
        job_request(args(config))
    assert caught.value.param == "suffix" and "line 3" in caught.value.message


def test_a_bad_flag_names_the_hyperparameter(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as caught:
        job_request(args(file="treino.jsonl", batch_size=0))
    assert caught.value.param == "hyperparameters.batch_size"
