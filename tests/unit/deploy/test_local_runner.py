"""The local runner starts one trainer per GPU (or group of GPUs), pinned with CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

from pathlib import Path

import pytest

from afina.deploy import runner
from afina.deploy.processes import ManagedProcess
from afina.deploy.runner import StackState, trainer_groups, visible_gpus


def test_gpus_are_split_into_one_group_per_trainer() -> None:
    assert trainer_groups([], 1) == []
    assert trainer_groups(["0", "1", "2"], 1) == ["0", "1", "2"]
    assert trainer_groups(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
    assert trainer_groups(["0", "1", "2"], 2) == ["0,1"]  # a remainder too small for a worker stays unused
    assert trainer_groups(["0"], 2) == []


def test_visible_gpus_come_from_cuda_visible_devices_first() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1, 3"}) == ["1", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []  # set but empty: the operator hid every GPU


def test_one_trainer_per_gpu_each_pinned_and_a_cpu_trainer_without_gpus(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    started: list[tuple[list[str], str | None, str | None]] = []

    def fake_start(state: StackState, services: list[str], name: str | None = None,
                   gpus: str | None = None) -> ManagedProcess:
        started.append((services, name, gpus))
        return ManagedProcess(name=name or "", pid=0, log="", gpus=gpus)

    monkeypatch.setattr(runner, "start_worker", fake_start)
    state = StackState(mode="services", home=str(tmp_path), base_url="", api_key="",
                       env={"CUDA_VISIBLE_DEVICES": "0,1,2,3", "AFINA_GPUS_PER_WORKER": "1"})
    trainers = runner.start_trainers(state)
    assert started == [(["trainer"], f"trainer-gpu{n}", str(n)) for n in range(4)]
    assert [t.gpus for t in trainers] == ["0", "1", "2", "3"]
    started.clear()
    state.env["AFINA_GPUS_PER_WORKER"] = "2"
    runner.start_trainers(state)
    assert started == [(["trainer"], "trainer-gpu0,1", "0,1"), (["trainer"], "trainer-gpu2,3", "2,3")]
    started.clear()
    state.env["CUDA_VISIBLE_DEVICES"] = ""
    runner.start_trainers(state)
    assert started == [(["trainer"], "trainer", None)]
