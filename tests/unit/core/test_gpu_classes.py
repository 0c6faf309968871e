"""GPU classes: the queue a train stage goes to, what a trainer consumes, and when a job moves to a larger GPU."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from afina.core.errors import InsufficientMemory, InvalidRequest
from afina.core.gpu_classes import (
    GIB,
    NeedsLargerGpu,
    check_job_placement,
    larger_class_for,
    reroute_or_raise,
    worker_train_queues,
)
from afina.core.queue.names import train_queue
from afina.core.settings import Settings
from afina.core.training import parse_training_spec

CLASSES = {"l4": 24, "a100-80gb": 80, "h200": 141}


def settings(**values: object) -> Settings:
    return Settings(gpu_classes=CLASSES, **values)


def short_of(needed_gib: float, available_gib: float = 20.0) -> InsufficientMemory:
    return InsufficientMemory("does not fit", needed_bytes=needed_gib * GIB, available_bytes=available_gib * GIB)


def test_a_train_queue_names_the_class_and_the_gpu_count() -> None:
    assert train_queue(None) == "train"
    assert train_queue("a100-80gb") == "train.a100-80gb"
    assert train_queue(None, 2) == "train.x2"
    assert train_queue("h200", 4) == "train.h200.x4"


def test_a_trainer_consumes_its_class_for_each_gpu_count_it_owns_and_the_default_queue_only_as_default() -> None:
    assert worker_train_queues(Settings()) == ["train"]
    assert worker_train_queues(Settings(gpus_per_worker=2)) == ["train", "train.x2"]
    assert worker_train_queues(settings(gpu_class="a100-80gb", default_gpu_class="l4")) == ["train.a100-80gb"]
    assert worker_train_queues(settings(gpu_class="l4", default_gpu_class="l4", gpus_per_worker=2)) == [
        "train.l4", "train.l4.x2", "train", "train.x2"]


def test_a_job_may_name_only_a_declared_class_and_at_most_the_gpus_a_worker_owns() -> None:
    check_job_placement(settings(), "h200", 1)
    check_job_placement(settings(gpus_per_worker=4), None, 4)
    with pytest.raises(InvalidRequest, match=r"Unknown GPU class 'v100'.*\['a100-80gb', 'h200', 'l4'\]") as unknown:
        check_job_placement(settings(), "v100", 1)
    assert unknown.value.param == "hyperparameters.gpu_class"
    with pytest.raises(InvalidRequest, match="declares no GPU classes"):
        check_job_placement(Settings(), "l4", 1)
    with pytest.raises(InvalidRequest, match="at most 1 GPU") as too_many:
        check_job_placement(settings(), None, 2)
    assert too_many.value.param == "hyperparameters.num_gpus"


def test_the_smallest_larger_class_that_holds_the_estimate_is_chosen() -> None:
    assert larger_class_for(settings(), 30 * GIB, 24 * GIB).name == "a100-80gb"
    assert larger_class_for(settings(), 100 * GIB, 24 * GIB).name == "h200"
    assert larger_class_for(settings(), 140 * GIB, 24 * GIB) is None  # 92% of 141 GiB is usable
    assert larger_class_for(settings(), 30 * GIB, 80 * GIB).name == "h200"  # never the same or a smaller GPU
    assert larger_class_for(Settings(), 30 * GIB, 24 * GIB) is None


def test_a_job_that_does_not_fit_moves_to_a_larger_class_unless_it_named_its_own_or_runs_on_a_cpu() -> None:
    with pytest.raises(NeedsLargerGpu, match=r"needs about 30\.0 GiB.*20\.0 GiB free.*'a100-80gb' \(80 GiB\)") as moved:
        reroute_or_raise(settings(), short_of(30), device="cuda", asked_class=None, this_gpu_bytes=24 * GIB)
    assert moved.value.gpu_class == "a100-80gb"
    # each of these returns, and the caller fails the job with the preflight's own advice
    reroute_or_raise(settings(), short_of(30), device="cuda", asked_class="l4", this_gpu_bytes=24 * GIB)
    reroute_or_raise(settings(), short_of(30), device="cpu", asked_class=None, this_gpu_bytes=None)
    reroute_or_raise(settings(), short_of(200), device="cuda", asked_class=None, this_gpu_bytes=24 * GIB)
    reroute_or_raise(Settings(), short_of(30), device="cuda", asked_class=None, this_gpu_bytes=24 * GIB)


@pytest.mark.parametrize("values, problem", [
    ({"gpu_classes": {"X2": 24}}, "not a class name"),
    ({"gpu_classes": {"x2": 24}}, "not a class name"),  # the GPU-count suffix
    ({"gpu_classes": {"l4": 0}}, "not a class name"),
    ({"gpu_classes": CLASSES, "gpu_class": "v100"}, "AFINA_GPU_CLASS='v100' is not one of"),
    ({"gpu_class": "l4"}, "AFINA_GPU_CLASS='l4' is not one of the classes AFINA_GPU_CLASSES declares \\(none\\)"),
    ({"gpu_classes": CLASSES, "default_gpu_class": "t4"}, "AFINA_DEFAULT_GPU_CLASS='t4'"),
])
def test_settings_refuse_an_undeclared_or_malformed_class(values: dict, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Settings(**values)


def test_an_empty_class_variable_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFINA_GPU_CLASS", "")
    monkeypatch.setenv("AFINA_DEFAULT_GPU_CLASS", "")
    monkeypatch.setenv("AFINA_GPU_CLASSES", "{}")
    assert Settings().gpu_class is None and Settings().default_gpu_class is None


def test_the_job_request_checks_the_class_name_and_gpu_count() -> None:
    spec = parse_training_spec({"gpu_class": "a100-80gb", "num_gpus": 2})
    assert (spec.gpu_class, spec.num_gpus) == ("a100-80gb", 2)
    for bad in ({"gpu_class": "A100"}, {"gpu_class": "x4"}, {"gpu_class": "a" * 33}, {"num_gpus": 0},
                {"num_gpus": 9}):
        with pytest.raises(InvalidRequest) as refused:
            parse_training_spec(bad)
        assert refused.value.param == f"hyperparameters.{next(iter(bad))}"


def test_a_lease_owner_names_the_gpus_its_worker_is_pinned_to(monkeypatch: pytest.MonkeyPatch) -> None:
    from afina.core.queue.jobs import new_owner, owner_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert owner_gpus(new_owner()) == "2,3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert owner_gpus(new_owner()) is None and owner_gpus(None) is None
