"""``/v1/fine_tuning/jobs`` through the official client: create, read, page, cancel, events, checkpoints."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from afina.core.db import repository as repo
from afina.core.naming import fine_tuned_model_name
from tests.integration.gateway.conftest import SMOLLM2, Gateway


def _bad_request(call: Any, **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as caught:
        call(**kwargs)
    return caught.value.body


def test_create_retrieve_and_events(gateway: Gateway, acme, upload) -> None:  # noqa: ANN001
    training = upload()
    job = acme.fine_tuning.jobs.create(model=SMOLLM2, training_file=training.id, suffix="support-bot",
                                       seed=7, metadata={"team": "support"},
                                       hyperparameters={"n_epochs": 2})
    assert job.id.startswith("ftjob-")
    assert (job.object, job.status, job.model, job.organization_id) == ("fine_tuning.job", "validating_files",
                                                                         SMOLLM2, "acme")
    assert (job.training_file, job.validation_file, job.seed, job.metadata) == (training.id, None, 7,
                                                                                 {"team": "support"})
    assert job.fine_tuned_model is None and job.error is None and job.finished_at is None
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == "auto"
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 2
    assert job.result_files == [] and job.integrations == []

    again = acme.fine_tuning.jobs.retrieve(job.id)
    assert again.model_dump() == job.model_dump()

    events = acme.fine_tuning.jobs.list_events(job.id).data
    assert [event.message for event in events] == [f"Validating training file: {training.id}",
                                                   f"Created fine-tuning job: {job.id}"]
    assert all(event.object == "fine_tuning.job.event" and event.level == "info" for event in events)

    with gateway.runtime.db.session() as session:
        row = repo.get_job(session, "acme", job.id)
        assert (row.stage, row.suffix, row.user_metadata) == ("ingest", "support-bot", {"team": "support"})
    # the ingest message went to the (filesystem) broker
    queued = list((gateway.runtime.settings.broker_folder / "queue").glob("*"))
    assert any(job.id in path.read_text() for path in queued)


def test_method_form_and_hyperparameter_merge(acme, upload) -> None:  # noqa: ANN001
    training, validation = upload(), upload()
    job = acme.fine_tuning.jobs.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file=training.id, validation_file=validation.id,
        hyperparameters={"n_epochs": 5, "batch_size": 4},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3,
                                                                          "learning_rate_multiplier": 0.5}}},
        integrations=[{"type": "wandb", "wandb": {"project": "x"}}])
    assert job.model == SMOLLM2  # an alias resolves to the catalog id
    assert job.validation_file == validation.id
    assert job.hyperparameters.model_dump() == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.5}
    assert job.integrations == []
    assert isinstance(job.seed, int)


def test_list_pagination(acme, upload) -> None:  # noqa: ANN001
    training = upload()
    created = [acme.fine_tuning.jobs.create(model=SMOLLM2, training_file=training.id).id for _ in range(3)]
    first = acme.fine_tuning.jobs.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    second = acme.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert not {job.id for job in first.data} & {job.id for job in second.data}
    everything = [job.id for job in acme.fine_tuning.jobs.list(limit=2)]
    assert set(created) <= set(everything) and len(everything) == len(set(everything))


def test_cancel_without_a_worker_is_immediate(acme, upload) -> None:  # noqa: ANN001
    job = acme.fine_tuning.jobs.create(model=SMOLLM2, training_file=upload().id)
    cancelled = acme.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert acme.fine_tuning.jobs.list_events(job.id, limit=1).data[0].message == "Job cancelled"
    with pytest.raises(openai.ConflictError):
        acme.fine_tuning.jobs.cancel(job.id)


def test_cancel_while_a_worker_holds_the_lease_is_cooperative(gateway: Gateway, acme, upload) -> None:  # noqa: ANN001
    job = acme.fine_tuning.jobs.create(model=SMOLLM2, training_file=upload().id)
    with gateway.runtime.db.session() as session:
        assert repo.acquire_lease(session, job.id, "worker-1", 60)
    assert acme.fine_tuning.jobs.cancel(job.id).status == "validating_files"
    with gateway.runtime.db.session() as session:
        assert repo.get_job(session, "acme", job.id).cancel_requested


def test_events_with_metrics_and_paging(gateway: Gateway, acme, upload) -> None:  # noqa: ANN001
    job = acme.fine_tuning.jobs.create(model=SMOLLM2, training_file=upload().id)
    with gateway.runtime.db.session() as session:
        repo.add_event(session, job.id, "Step 1/10: training loss=2.31", event_type="metrics",
                       data={"step": 1, "train_loss": 2.31})
    events = acme.fine_tuning.jobs.list_events(job.id, limit=1)
    assert events.has_more and events.data[0].type == "metrics" and events.data[0].data["train_loss"] == 2.31
    rest = acme.fine_tuning.jobs.list_events(job.id, after=events.data[0].id, limit=10)
    assert len(rest.data) == 2 and not rest.has_more


def test_checkpoints(gateway: Gateway, acme, upload) -> None:  # noqa: ANN001
    job = acme.fine_tuning.jobs.create(model=SMOLLM2, training_file=upload().id, suffix="ckpt")
    with gateway.runtime.db.session() as session:
        for step in (10, 20):
            repo.add_checkpoint(session, job.id, step, f"jobs/acme/{job.id}/checkpoints/step-{step:07d}",
                                {"train_loss": 1.0 / step})
    checkpoints = acme.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [20, 10]
    expected = fine_tuned_model_name(SMOLLM2, "acme", "ckpt", job.id)
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{expected}:ckpt-step-20"
    assert checkpoints[0].fine_tuning_job_id == job.id and checkpoints[0].metrics.train_loss == 0.05


@pytest.mark.parametrize("changes, param", [
    ({"suffix": "has spaces"}, "suffix"),
    ({"suffix": "x" * 65}, "suffix"),
    ({"suffix": "ft:evil"}, "suffix"),
    ({"model": "gpt-4o-mini"}, "model"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": "three"}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 2.5}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"warmup": 3}}, "hyperparameters.warmup"),
    ({"method": {"type": "dpo", "dpo": {}}}, "method.type"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": -2}}}},
     "method.supervised.hyperparameters.n_epochs"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"seed": -1}, "seed"),
    ({"training_file": "file-doesnotexist"}, "training_file"),
    ({"validation_file": "file-doesnotexist"}, "validation_file"),
])
def test_invalid_requests_name_the_param(acme, upload, changes: dict[str, Any], param: str) -> None:  # noqa: ANN001
    request = {"model": SMOLLM2, "training_file": upload().id, **changes}
    body = _bad_request(acme.fine_tuning.jobs.create, **request)
    assert body["param"] == param, body
    assert body["type"] == "invalid_request_error"


def test_training_file_is_required(gateway: Gateway) -> None:
    response = httpx.post(f"{gateway.url}/v1/fine_tuning/jobs", json={"model": SMOLLM2},
                          headers={"Authorization": f"Bearer {gateway.keys['acme']}"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "training_file"


def test_other_tenants_objects_are_invisible(acme, globex, upload) -> None:  # noqa: ANN001
    training = upload()
    job = acme.fine_tuning.jobs.create(model=SMOLLM2, training_file=training.id)
    assert _bad_request(globex.fine_tuning.jobs.create, model=SMOLLM2,
                        training_file=training.id)["param"] == "training_file"
    for call in (globex.fine_tuning.jobs.retrieve, globex.fine_tuning.jobs.cancel,
                 globex.fine_tuning.jobs.list_events, globex.fine_tuning.jobs.checkpoints.list):
        with pytest.raises(openai.NotFoundError):
            call(job.id)
    assert job.id not in [j.id for j in globex.fine_tuning.jobs.list(limit=100).data]
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "validating_files"


def test_a_job_can_continue_from_a_fine_tuned_model(gateway: Gateway, acme, globex, upload) -> None:  # noqa: ANN001
    """OpenAI's way of continuing training: ``model`` names an earlier fine-tuned model of the tenant."""
    name = fine_tuned_model_name(SMOLLM2, "acme", "v1", "ftjob-parent0000000000000000001")
    with gateway.runtime.db.session() as session:
        repo.register_model(session, name=name, tenant_id="acme", base_model=SMOLLM2,
                            job_id="ftjob-parent0000000000000000001", artifacts={})
    training = upload()
    job = acme.fine_tuning.jobs.create(model=name, training_file=training.id, suffix="v2")
    assert job.model == SMOLLM2  # trained on the same base, starting from the earlier adapter
    with gateway.runtime.db.session() as session:
        row = repo.get_job(session, "acme", job.id)
        assert row.method["supervised"]["init_from"] == {"model": name, "job_id": "ftjob-parent0000000000000000001"}

    body = _bad_request(acme.fine_tuning.jobs.create, model="ft:smollm2-135m-instruct:acme:nope:ftjob-x",
                        training_file=training.id)
    assert (body["param"], body["code"]) == ("model", "model_not_found")
    # another tenant's fine-tuned model is not a model it can continue from
    other = upload(client=globex)
    body = _bad_request(globex.fine_tuning.jobs.create, model=name, training_file=other.id)
    assert (body["param"], body["code"]) == ("model", "model_not_found")


def test_a_job_names_only_a_declared_gpu_class_and_the_gpus_a_trainer_owns(acme, upload) -> None:  # noqa: ANN001
    training = upload()
    unknown = _bad_request(acme.fine_tuning.jobs.create, model=SMOLLM2, training_file=training.id,
                           hyperparameters={"gpu_class": "a100-80gb"})
    assert unknown["param"] == "hyperparameters.gpu_class"
    assert "Unknown GPU class 'a100-80gb'" in unknown["message"]
    too_many = _bad_request(acme.fine_tuning.jobs.create, model=SMOLLM2, training_file=training.id,
                            method={"type": "supervised", "supervised": {"hyperparameters": {"num_gpus": 2}}})
    assert too_many["param"] == "hyperparameters.num_gpus" and "at most 1 GPU" in too_many["message"]
    malformed = _bad_request(acme.fine_tuning.jobs.create, model=SMOLLM2, training_file=training.id,
                             hyperparameters={"gpu_class": "x2"})
    assert malformed["param"] == "hyperparameters.gpu_class" and "GPU count" in malformed["message"]
