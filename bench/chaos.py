"""Chaos runner: N fine-tuning jobs through the multi-process stack while workers and servers fail under them.

    .venv/bin/python bench/chaos.py --jobs 4 --seed 7 --fault-every 12,30

Starts a stack of its own (a private PostgreSQL cluster, a private Redis with AOF on,
SeaweedFS, the gateway and one ingest, trainer and exporter worker, each a process), submits
``--jobs`` jobs with the official ``openai`` client, and while they run injects a random fault
every ``--fault-every`` seconds: SIGKILL of the worker that holds a job (or of a random one),
a Redis restart, a PostgreSQL crash-restart (``pg_ctl -m immediate``), a SeaweedFS restart.
At the end it reports, for every job: its status, the models registered for it, how many
times a stage resumed, and whether its loss curve is continuous (steps 1..N, each run after a
resume starting right after the checkpoint it resumed from). Each job lands in one category:

- ``succeeded``;
- ``failed`` — ended ``failed``/``cancelled`` with an error that says why (e.g.
  ``stage_attempts_exhausted``: the attempts cap working, not a loss), counted per error code;
- ``lost`` — vanished, or not finished by the deadline with nothing left to move it (no lease,
  no unsent outbox message, no message waiting in Redis);
- ``stuck`` — not finished by the deadline although something still holds or carries it;

and, across categories, ``duplicated``: two models, two runs of a stage at once, or a stage run
to completion twice. Lost, duplicated and stuck must be 0. ``--baseline`` first runs the same
jobs on a fresh stack without faults. The JSON report goes to ``bench/results/``.

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

# the event each stage records once when it completes: seen twice, the stage ran to completion twice
STAGE_DONE_MARKERS = {"ingest": ("Files validated; job queued for training",), "train": ("Adapter saved (",),
                      "export": ("is ready (serving", "exported again (serving")}
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
    error_code: str | None = None
    stage: str | None = None
    completions: dict[str, int] = field(default_factory=dict)  # stage -> times it recorded its completion
    active: list[str] = field(default_factory=list)  # what still holds or carries an unfinished job
    category: str = ""  # succeeded | failed | lost | stuck

    @property
    def duplicated(self) -> bool:
        return self.models > 1 or self.overlapping or any(count > 1 for count in self.completions.values())


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
    failed: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)  # error code -> jobs

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
    except BaseException:  # the stack did not come up: leave no server of ours behind
        from afina.deploy.processes import stop

        stop(s3.process.pid)
        redis.stop()
        postgres.stop()
        shutil.rmtree(postgres.data_dir.parent, ignore_errors=True)
        raise
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


def pick_fault(stack: ChaosStack, rng: random.Random, kinds: tuple[str, ...], done: Counter | None = None) -> str:
    """Half the time, kill the worker that holds a job right now (the fault that hurts); else a kind not injected
    yet (``done``), so that every kind is exercised early; once all have been, any fault."""
    busy = [f"kill_{STAGE_SERVICE[stage]}" for stage in running_stages(stack) if stage in STAGE_SERVICE]
    busy = [kind for kind in busy if kind in kinds]
    if busy and rng.random() < 0.5:
        return rng.choice(busy)
    unseen = [kind for kind in kinds if not (done or {}).get(kind)]
    return rng.choice(unseen or kinds)


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


def active_work(stack: ChaosStack, job_id: str) -> tuple[str | None, list[str]]:
    """The job's stage, and what still holds or carries it: a lease (live, or expired and due for the recovery
    sweep), an unsent outbox message, a message waiting in a Redis queue. Nothing: no one will move the job."""
    import redis
    from sqlalchemy import create_engine, text

    engine = create_engine(stack.postgres.url)
    try:
        with engine.connect() as connection:
            row = connection.execute(text("SELECT stage, lease_owner FROM jobs WHERE id = :id"), {"id": job_id}).first()
            unsent = connection.execute(text("SELECT count(*) FROM outbox WHERE subject_id = :id AND sent_at IS NULL"),
                                        {"id": job_id}).scalar()
    finally:
        engine.dispose()
    if row is None:
        return None, []
    active = [f"lease:{row.lease_owner}"] if row.lease_owner else []
    active += [f"outbox:{unsent}"] if unsent else []
    # a SIGKILLed worker's unacked message is not counted: it comes back only after the 7-day visibility timeout
    client = redis.Redis.from_url(stack.redis.url)
    for key in client.scan_iter():
        if client.type(key) == b"list" and any(job_id.encode() in raw for raw in client.lrange(key, 0, -1)):
            active.append(f"queued:{key.decode()}")
    return row.stage, active


def categorize(outcome: JobOutcome) -> str:
    if outcome.status == "succeeded":
        return "succeeded"
    if outcome.status == "cancelled":
        return "failed"  # reason: cancelled (the runner never cancels; someone did)
    if outcome.status == "failed":
        return "failed" if outcome.error_code else "lost"  # a failure nobody can explain is as good as lost
    return "stuck" if outcome.active else "lost"


def outcome(stack: ChaosStack, job_id: str) -> JobOutcome:
    """What the user sees of one job, and whether its stages ran once each, in order."""
    import openai

    client = stack.client()
    try:
        job = client.fine_tuning.jobs.retrieve(job_id)
    except openai.NotFoundError:
        return JobOutcome(job_id=job_id, status="vanished", error=None, models=0, resumes=0, steps=[],
                          continuous=False, overlapping=False, category="lost")
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
    completions = {stage: sum(1 for event in events if any(marker in event.message for marker in markers))
                   for stage, markers in STAGE_DONE_MARKERS.items()}
    stage, active = active_work(stack, job_id) if job.status not in TERMINAL else (None, [])
    result = JobOutcome(job_id=job_id, status=job.status, error=error, models=len(models), resumes=resumes,
                        steps=steps, continuous=continuous, overlapping=overlapping,
                        error_code=job.error.code if job.error else None, stage=stage, completions=completions,
                        active=active)
    result.category = categorize(result)
    return result


def run_chaos(workdir: Path, model_cache: Path, *, jobs: int, seed: int, fault_every: tuple[float, float],
              deadline_s: float, kinds: tuple[str, ...] = FAULT_KINDS, schedule: list[str] | None = None,
              examples: int = 24, log=print) -> ChaosReport:  # noqa: ANN001
    """Run the jobs under faults (random from ``kinds``, or ``schedule`` in order) and report what happened."""
    rng = random.Random(seed)
    stack = start_stack(workdir, model_cache)
    started = time.monotonic()
    fault_log: list[dict[str, Any]] = []
    try:
        job_ids = submit_jobs(stack, jobs, examples)
        log(f"submitted {jobs} jobs: {job_ids}")
        pending_schedule = list(schedule or [])
        next_fault = time.monotonic() + rng.uniform(*fault_every)
        current: dict[str, str] = {}
        while time.monotonic() - started < deadline_s:
            current = statuses(stack, job_ids) or current
            if current and all(status in TERMINAL for status in current.values()) and not pending_schedule:
                break
            if time.monotonic() >= next_fault and (schedule is None or pending_schedule):
                kind = pending_schedule.pop(0) if schedule is not None else \
                    pick_fault(stack, rng, kinds, Counter(f["kind"] for f in fault_log))
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
    categories = Counter(o.category for o in outcomes)
    report = ChaosReport(
        jobs=jobs, seed=seed, seconds=round(seconds, 1), faults=dict(Counter(f["kind"] for f in fault_log)),
        fault_log=fault_log, succeeded=categories["succeeded"], lost=categories["lost"],
        duplicated=sum(o.duplicated for o in outcomes), stuck=categories["stuck"], outcomes=outcomes,
        failed=categories["failed"], failed_reasons=dict(Counter(o.error_code or o.status for o in outcomes
                                                                 if o.category == "failed")))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fault-every", default="12,30", help="seconds between faults: MIN,MAX")
    parser.add_argument("--deadline", type=float, default=1800)
    parser.add_argument("--kinds", default=",".join(FAULT_KINDS))
    parser.add_argument("--examples", type=int, default=24, help="chats per job (SmolLM2-135M, batch 4, 1 epoch)")
    parser.add_argument("--baseline", action="store_true",
                        help="first run the same jobs on a fresh stack without faults, for comparison")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops its stack (finally)
    low, high = (float(part) for part in args.fault_every.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="afina-chaos-"))
    model_cache = Path(os.environ.get("AFINA_BENCH_MODEL_CACHE", workdir / "models"))
    baseline: ChaosReport | None = None
    try:
        if args.baseline:
            baseline = run_chaos(workdir / "baseline", model_cache, jobs=args.jobs, seed=args.seed,
                                 fault_every=(low, high), deadline_s=args.deadline, schedule=[],
                                 examples=args.examples)
            print(json.dumps({"baseline": summary(baseline)}, indent=2), flush=True)
        report = run_chaos(workdir / "chaos", model_cache, jobs=args.jobs, seed=args.seed, fault_every=(low, high),
                           deadline_s=args.deadline, kinds=tuple(args.kinds.split(",")), examples=args.examples)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = REPO_ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = {"date": stamp, "command": " ".join(sys.argv), **asdict(report)}
    if baseline is not None:
        payload["baseline"] = asdict(baseline)
    (results / f"chaos-{stamp}.json").write_text(json.dumps(payload, indent=2))
    print(json.dumps({"chaos": summary(report)}, indent=2))
    sys.exit(0 if report.clean and (baseline is None or baseline.clean) else 1)


def summary(report: ChaosReport) -> dict[str, Any]:
    keys = ("jobs", "seconds", "faults", "succeeded", "failed", "failed_reasons", "lost", "duplicated", "stuck")
    return {key: getattr(report, key) for key in keys}


if __name__ == "__main__":
    main()
