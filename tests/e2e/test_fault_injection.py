"""Fault injection in multi-process mode: every worker SIGKILLed mid-job, Redis, PostgreSQL and SeaweedFS restarted.

The chaos runner of ``bench/chaos.py`` drives two jobs through the whole stack (private
PostgreSQL and Redis with AOF, SeaweedFS, gateway, ingest, trainer and exporter workers)
and injects each fault kind once, in a seeded order. Each job must end ``succeeded`` exactly
once, with one model, and a loss curve that continues from its checkpoints.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]
CHAOS = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


def load_chaos():  # noqa: ANN201 - the bench module
    spec = importlib.util.spec_from_file_location("afina_bench_chaos", CHAOS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_fault_kind_once_and_each_job_succeeds_exactly_once(tmp_path: Path, shared_model_cache: Path) -> None:
    chaos = load_chaos()
    schedule = list(chaos.FAULT_KINDS)
    random.Random(11).shuffle(schedule)
    report = chaos.run_chaos(tmp_path / "chaos", shared_model_cache, jobs=2, seed=11, fault_every=(6, 12),
                             deadline_s=1200, schedule=schedule)
    assert report.faults == dict.fromkeys(chaos.FAULT_KINDS, 1), report.fault_log
    for job in report.outcomes:
        assert job.status == "succeeded", job
        assert job.models == 1, job
        assert job.continuous and not job.overlapping, job
    assert (report.lost, report.duplicated, report.stuck) == (0, 0, 0)
