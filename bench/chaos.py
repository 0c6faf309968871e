"""Chaos runner: N fine-tuning jobs through the multi-process stack while workers and servers fail under them.

    .venv/bin/python bench/chaos.py --jobs 4 --seed 7 --fault-every 12,30

Starts a stack of its own (a private PostgreSQL cluster, a private Redis with AOF on,
SeaweedFS, the gateway and one ingest, trainer and exporter worker, each a process), submits
``--jobs`` jobs with the official ``openai`` client, and while they run injects a random fault
every ``--fault-every`` seconds: SIGKILL of the worker that holds a job (or of a random one),
a Redis restart, a PostgreSQL crash-restart (``pg_ctl -m immediate``), a SeaweedFS restart.
At the end it reports, for every job: its status, the models registered for it, how many
times a stage resumed, and whether its loss curve is continuous (steps 1..N, each run after a
resume starting right after the checkpoint it resumed from) — and in total the jobs lost
(failed or vanished), duplicated (two models, or two runs of a stage at once) and stuck (not
finished by the deadline). All three must be 0. The JSON report goes to ``bench/results/``.

``tests/e2e/test_fault_injection.py`` runs the same code with every fault kind once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from afina.deploy.processes import alive  # noqa: E402
from afina.deploy.runner import StackState, down, load_state, restart_worker, up_services  # noqa: E402
from afina.deploy.seaweedfs import SeaweedS3, restart_seaweedfs, start_seaweedfs  # noqa: E402
from tests.support.servers import (  # noqa: E402
    PrivatePostgres,
    PrivateRedis,
    start_private_postgres,
    start_private_redis,
)

FAULT_KINDS = ("kill_ingest", "kill_trainer", "kill_exporter", "restart_redis", "restart_postgres", "restart_s3")
STAGE_SERVICE = {"ingest": "ingest", "train": "trainer", "export": "exporter"}
SAMPLE = REPO_ROOT / "cli" / "afina" / "cli" / "data" / "aeon_sample.jsonl"
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class JobOutcome:
    job_id: str
    status: str
    error: str | None
    models: int
    resumes: int
    steps: list[int]
    continuous: bool
    overlapping: bool


@dataclass
class ChaosReport:
    jobs: int
    seed: int
    seconds: float
    faults: dict[str, int]
    fault_log: list[dict[str, Any]]
    succeeded: int
    lost: int
    duplicated: int
    stuck: int
    outcomes: list[JobOutcome] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.stuck == 0 and self.succeeded == self.jobs


@dataclass
class ChaosStack:
    """The stack and the servers under it, each restartable by the runner."""

    home: Path
    redis: PrivateRedis
    postgres: PrivatePostgres
    s3: SeaweedS3
    state: StackState
    env: dict[str, str]

    def client(self):  # noqa: ANN201 - openai.OpenAI
        import openai

        return openai.OpenAI(base_url=self.state.base_url, api_key=self.state.api_key, max_retries=8, timeout=120)

    def worker_pid(self, service: str) -> int:
        return (load_state(self.home) or self.state).process(service).pid


def start_stack(workdir: Path, model_cache: Path) -> ChaosStack:
    """Private servers, then ``afina up --services`` against them with short leases (recovery in seconds)."""
    redis = start_private_redis(workdir / "redis")
    postgres = start_private_postgres()
    env = dict(os.environ)
    s3 = start_seaweedfs(workdir / "s3", workdir / "logs", env)
    overrides = {
        "AFINA_DATABASE_URL": postgres.url, "AFINA_BROKER_URL": redis.url, "AFINA_STORE_BACKEND": "s3",
        "AFINA_S3_ENDPOINT": s3.endpoint, "AFINA_S3_ACCESS_KEY": s3.access_key, "AFINA_S3_SECRET_KEY": s3.secret_key,
        "AFINA_MODEL_CACHE_DIR": str(model_cache), "AFINA_LEASE_S": "8", "AFINA_HEARTBEAT_S": "1",
        "AFINA_RECOVERY_INTERVAL_S": "2", "AFINA_OUTBOX_RELAY_INTERVAL_S": "0.5", "AFINA_ORPHAN_REQUEUE_S": "120",
        "AFINA_TRANSIENT_REQUEUE_DELAY_S": "3", "AFINA_MAX_STAGE_ATTEMPTS": "8", "AFINA_LOG_JSON": "false",
        "AFINA_EXPORT_QUANTIZATIONS": '["Q8_0"]',
    }
    saved = dict(os.environ)
    os.environ.update(overrides)
    try:
        state = up_services(workdir / "stack")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return ChaosStack(home=(workdir / "stack").resolve(), redis=redis, postgres=postgres, s3=s3, state=state,
                      env={**env, **overrides})


def stop_stack(stack: ChaosStack) -> None:
    down(stack.home)
    from afina.deploy.processes import stop

    stop(stack.s3.process.pid)
    stack.redis.stop()
    stack.postgres.stop()
    shutil.rmtree(stack.postgres.data_dir.parent, ignore_errors=True)


def running_stages(stack: ChaosStack) -> list[str]:
    """The stages some worker holds a lease for now (read from the registry)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(stack.postgres.url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT stage FROM jobs WHERE lease_owner IS NOT NULL")).all()
        return [row[0] for row in rows]
    except Exception:  # noqa: BLE001 - the database may be the thing restarting right now
        return []
    finally:
        engine.dispose()


def inject(stack: ChaosStack, kind: str) -> dict[str, Any]:
    """Apply one fault and bring the failed part back; returns what was done."""
    started = time.monotonic()
    detail: dict[str, Any] = {"kind": kind}
    if kind.startswith("kill_"):
        service = kind.removeprefix("kill_")
        pid = stack.worker_pid(service)
        os.killpg(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.1)
        detail["busy_stages"] = running_stages(stack)
        restart_worker(stack.home, service)
    elif kind == "restart_redis":
        stack.redis.stop()
        time.sleep(1)
        stack.redis.start()
    elif kind == "restart_postgres":
        stack.postgres.restart()
    elif kind == "restart_s3":
        stack.s3 = restart_seaweedfs(stack.s3, stack.home.parent / "logs", stack.env)
    else:
        raise ValueError(f"unknown fault {kind!r}")
    detail["seconds"] = round(time.monotonic() - started, 1)
    return detail


def pick_fault(stack: ChaosStack, rng: random.Random, kinds: tuple[str, ...]) -> str:
    """Half the time, kill the worker that holds a job right now (the fault that hurts); else any fault."""
    busy = [f"kill_{STAGE_SERVICE[stage]}" for stage in running_stages(stack) if stage in STAGE_SERVICE]
    busy = [kind for kind in busy if kind in kinds]
    if busy and rng.random() < 0.5:
        return rng.choice(busy)
    return rng.choice(kinds)


def submit_jobs(stack: ChaosStack, count: int, examples: int = 24) -> list[str]:
    client = stack.client()
    data = b"\n".join(SAMPLE.read_bytes().splitlines()[:examples]) + b"\n"
    path = stack.home / "chaos.jsonl"
    path.write_bytes(data)
    with open(path, "rb") as handle:
        file_id = client.files.create(file=handle, purpose="fine-tune").id
    return [client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=file_id, suffix=f"chaos{i}",
                                           hyperparameters={"n_epochs": 1, "batch_size": 4, "save_steps": 2}).id
            for i in range(count)]


def statuses(stack: ChaosStack, job_ids: list[str]) -> dict[str, str]:
    client = stack.client()
    try:
        return {job_id: client.fine_tuning.jobs.retrieve(job_id).status for job_id in job_ids}
    except Exception:  # noqa: BLE001 - the gateway answers 503 while a server restarts
        return {}


def outcome(stack: ChaosStack, job_id: str) -> JobOutcome:
    """What the user sees of one job, and whether its stages ran once each, in order."""
    client = stack.client()
    job = client.fine_tuning.jobs.retrieve(job_id)
    events = list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=100))))  # oldest first
    models = [m.id for m in client.models.list().data if m.id.endswith(job_id)]
    segments: list[list[int]] = [[]]
    for event in events:
        if "Resuming from checkpoint" in event.message or "Resuming train stage" in event.message:
            segments.append([])
        if event.type == "metrics" and "train_loss" in (event.data or {}):
            segments[-1].append(int(event.data["step"]))
    segments = [segment for segment in segments if segment]
    steps = sorted({step for segment in segments for step in segment})
    # each run's steps strictly increase (two runs at once would interleave) ...
    overlapping = any(segment != sorted(set(segment)) for segment in segments)
    # ... and together they cover 1..N without a gap; a resumed run starts right after some earlier step
    continuous = bool(steps) and steps == list(range(1, steps[-1] + 1)) and all(
        later[0] - 1 in {0, *[s for earlier in segments[:i] for s in earlier]}
        for i, later in enumerate(segments) if i > 0)
    error = f"{job.error.code}: {job.error.message}" if job.error else None
    resumes = sum(1 for event in events if "Resuming" in event.message)
    return JobOutcome(job_id=job_id, status=job.status, error=error, models=len(models), resumes=resumes,
                      steps=steps, continuous=continuous, overlapping=overlapping)


def run_chaos(workdir: Path, model_cache: Path, *, jobs: int, seed: int, fault_every: tuple[float, float],
              deadline_s: float, kinds: tuple[str, ...] = FAULT_KINDS, schedule: list[str] | None = None,
              log=print) -> ChaosReport:  # noqa: ANN001
    """Run the jobs under faults (random from ``kinds``, or ``schedule`` in order) and report what happened."""
    rng = random.Random(seed)
    stack = start_stack(workdir, model_cache)
    started = time.monotonic()
    fault_log: list[dict[str, Any]] = []
    try:
        job_ids = submit_jobs(stack, jobs)
        log(f"submitted {jobs} jobs: {job_ids}")
        pending_schedule = list(schedule or [])
        next_fault = time.monotonic() + rng.uniform(*fault_every)
        current: dict[str, str] = {}
        while time.monotonic() - started < deadline_s:
            current = statuses(stack, job_ids) or current
            if current and all(status in TERMINAL for status in current.values()) and not pending_schedule:
                break
            if time.monotonic() >= next_fault and (schedule is None or pending_schedule):
                kind = pending_schedule.pop(0) if schedule is not None else pick_fault(stack, rng, kinds)
                detail = inject(stack, kind)
                detail["at_s"] = round(time.monotonic() - started, 1)
                fault_log.append(detail)
                log(f"fault {len(fault_log)}: {detail}")
                next_fault = time.monotonic() + rng.uniform(*fault_every)
            time.sleep(1)
        outcomes = [outcome(stack, job_id) for job_id in job_ids]
    except BaseException:
        for process in (load_state(stack.home) or stack.state).processes:
            tail = Path(process.log).read_text(errors="replace")[-3000:] if Path(process.log).exists() else ""
            log(f"--- {process.name}\n{tail}")
        raise
    finally:
        seconds = time.monotonic() - started
        stop_stack(stack)
    report = ChaosReport(
        jobs=jobs, seed=seed, seconds=round(seconds, 1), faults=dict(Counter(f["kind"] for f in fault_log)),
        fault_log=fault_log, succeeded=sum(o.status == "succeeded" for o in outcomes),
        lost=sum(o.status in {"failed", "cancelled"} for o in outcomes),
        duplicated=sum(o.models > 1 or o.overlapping for o in outcomes),
        stuck=sum(o.status not in TERMINAL for o in outcomes), outcomes=outcomes)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fault-every", default="12,30", help="seconds between faults: MIN,MAX")
    parser.add_argument("--deadline", type=float, default=1800)
    parser.add_argument("--kinds", default=",".join(FAULT_KINDS))
    args = parser.parse_args()
    low, high = (float(part) for part in args.fault_every.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="afina-chaos-"))
    model_cache = Path(os.environ.get("AFINA_BENCH_MODEL_CACHE", workdir / "models"))
    try:
        report = run_chaos(workdir, model_cache, jobs=args.jobs, seed=args.seed, fault_every=(low, high),
                           deadline_s=args.deadline, kinds=tuple(args.kinds.split(",")))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = REPO_ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = {"date": stamp, "command": " ".join(sys.argv), **asdict(report)}
    (results / f"chaos-{stamp}.json").write_text(json.dumps(payload, indent=2))
    print(json.dumps({k: payload[k] for k in ("jobs", "seconds", "faults", "succeeded", "lost", "duplicated",
                                              "stuck")}, indent=2))
    sys.exit(0 if report.clean else 1)


if __name__ == "__main__":
    main()
