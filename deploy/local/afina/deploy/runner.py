"""Bring the afina stack up or down on loopback, in one of two shapes (configuration only):

- embedded: SQLite, a local-directory store, Celery over the filesystem, llama.cpp
  in the gateway process; one gateway and one all-in-one worker.
- services: PostgreSQL, Redis, SeaweedFS (S3), and each service as its own
  process (gateway, ingest, trainer, exporter, evaluator and batch workers), serving through
  ``llama_cpp.server`` processes.

What was started is written to ``<home>/run/state.json`` so ``afina down`` stops
exactly those PIDs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from afina.deploy.processes import ManagedProcess, free_port, http_ok, port_open, spawn, stop, wait_ready
from afina.deploy.seaweedfs import start_seaweedfs

WORKER_SERVICES = {"ingest": "ingest", "trainer": "train", "exporter": "export", "evaluator": "evaluate",
                   "batcher": "batch"}


@dataclass
class StackState:
    mode: str
    home: str
    base_url: str
    api_key: str
    env: dict[str, str]
    processes: list[ManagedProcess] = field(default_factory=list)

    def save(self) -> None:
        path = state_path(Path(self.home))
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"mode": self.mode, "home": self.home, "base_url": self.base_url, "api_key": self.api_key,
                   "env": self.env, "processes": [p.as_dict() for p in self.processes]}
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(payload, indent=2))
        partial.chmod(0o600)  # holds the bootstrap API key
        partial.replace(path)

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.processes if p.name == name)


def state_path(home: Path) -> Path:
    return home / "run" / "state.json"


def load_state(home: Path) -> StackState | None:
    path = state_path(home)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    processes = [ManagedProcess(**p) for p in data.pop("processes")]
    return StackState(processes=processes, **data)


def _base_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()}
    env["AFINA_HOME"] = str(home)
    env.setdefault("AFINA_LOG_JSON", "true")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _bootstrap_key(env: dict[str, str], tenant: str) -> str:
    """Migrate the registry and create an API key for ``tenant`` with the stack's own settings."""
    from afina.core.db import repository as repo
    from afina.core.runtime import Runtime
    from afina.core.settings import Settings

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AFINA_")})
    try:
        runtime = Runtime(Settings())
        with runtime.db.session() as session:
            key = repo.create_api_key(session, tenant)
        runtime.db.dispose()
        return key
    finally:
        os.environ.clear()
        os.environ.update(saved)


def worker_command(services: list[str]) -> list[str]:
    queues = ",".join(WORKER_SERVICES[name] for name in services)
    return [sys.executable, "-m", "celery", "-A", "afina.core.queue.worker", "worker", "-Q", queues,
            "--concurrency", "1", "--pool", "prefork", "--without-gossip", "--without-mingle", "--loglevel", "INFO",
            "-n", f"{'-'.join(services)}@%h"]


def start_worker(state: StackState, services: list[str], name: str | None = None,
                 gpus: str | None = None) -> ManagedProcess:
    """A worker process for ``services``; pinned to the CUDA devices ``gpus`` ("0", "2,3") when given."""
    env = dict(state.env)
    env["AFINA_WORKER_SERVICES"] = ",".join(services)
    env["AFINA_METRICS_PORT"] = str(free_port())
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    process = spawn(name or "worker-" + "-".join(services), worker_command(services), env,
                    Path(state.home) / "logs", port=int(env["AFINA_METRICS_PORT"]))
    process.gpus = gpus
    wait_ready(process, lambda: port_open(process.port), 180)
    return process


def visible_gpus(env: dict[str, str]) -> list[str]:
    """The CUDA devices this host lets the stack use: ``CUDA_VISIBLE_DEVICES`` when set, else what
    ``nvidia-smi`` lists (none on a machine without it)."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [device.strip() for device in env["CUDA_VISIBLE_DEVICES"].split(",") if device.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def trainer_groups(gpus: list[str], gpus_per_worker: int) -> list[str]:
    """The GPUs of each trainer worker: one worker per ``gpus_per_worker`` devices (a remainder too small for
    a worker stays unused), so that jobs run side by side, one per GPU (or per group, for data parallel)."""
    size = max(1, gpus_per_worker)
    return [",".join(gpus[start:start + size]) for start in range(0, len(gpus) - size + 1, size)]


def start_trainers(state: StackState) -> list[ManagedProcess]:
    """One trainer per GPU group of this host (``trainer-gpu0``, …), or one CPU trainer where there is none."""
    groups = trainer_groups(visible_gpus(state.env), int(state.env.get("AFINA_GPUS_PER_WORKER", "1")))
    if not groups:
        return [start_worker(state, ["trainer"], name="trainer")]
    return [start_worker(state, ["trainer"], name=f"trainer-gpu{group}", gpus=group) for group in groups]


def start_gateway(state: StackState, port: int) -> ManagedProcess:
    command = [sys.executable, "-m", "uvicorn", "afina.gateway.app:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(port), "--no-access-log"]
    process = spawn("gateway", command, state.env, Path(state.home) / "logs", port=port)
    wait_ready(process, lambda: http_ok(f"http://127.0.0.1:{port}/health"), 120)
    return process


def up_embedded(home: Path, port: int | None = None, tenant: str = "default") -> StackState:
    home = home.resolve()
    port = port or free_port()
    env = _base_env(home)
    env.update({"AFINA_STORE_BACKEND": "local", "AFINA_INFERENCE_BACKEND": "inprocess",
                "AFINA_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}"})
    env.pop("AFINA_DATABASE_URL", None)
    env.pop("AFINA_BROKER_URL", None)
    state = StackState(mode="embedded", home=str(home), base_url=f"http://127.0.0.1:{port}/v1",
                       api_key=_bootstrap_key(env, tenant), env=env)
    try:
        state.processes.append(start_worker(state, list(WORKER_SERVICES), name="worker"))
        state.processes.append(start_gateway(state, port))
    except BaseException:
        _stop_all(state)
        raise
    state.save()
    return state


def _ensure_postgres_database(url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        exists = connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                    {"n": target.database}).first()
        if not exists:
            connection.execute(text(f'CREATE DATABASE "{target.database}"'))
    admin.dispose()


def _start_seaweedfs(state: StackState) -> ManagedProcess:
    server = start_seaweedfs(Path(state.home) / "seaweedfs", Path(state.home) / "logs", dict(os.environ))
    state.env.update({"AFINA_STORE_BACKEND": "s3", "AFINA_S3_ENDPOINT": server.endpoint,
                      "AFINA_S3_ACCESS_KEY": server.access_key, "AFINA_S3_SECRET_KEY": server.secret_key})
    return server.process


def up_services(home: Path, port: int | None = None, tenant: str = "default") -> StackState:
    """Every service as its own process against PostgreSQL, Redis and SeaweedFS."""
    home = home.resolve()
    port = port or free_port()
    env = _base_env(home)
    env.setdefault("AFINA_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/afina")
    env.setdefault("AFINA_BROKER_URL", "redis://127.0.0.1:6379/0")
    env.update({"AFINA_INFERENCE_BACKEND": "llamacpp-server", "AFINA_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}"})
    if env["AFINA_DATABASE_URL"].startswith("postgresql"):
        _ensure_postgres_database(env["AFINA_DATABASE_URL"])
    state = StackState(mode="services", home=str(home), base_url=f"http://127.0.0.1:{port}/v1", api_key="",
                       env=env)
    try:
        if env.get("AFINA_STORE_BACKEND", "s3") == "s3" and "AFINA_S3_ENDPOINT" not in os.environ:
            state.processes.append(_start_seaweedfs(state))
        state.api_key = _bootstrap_key(state.env, tenant)
        for service in WORKER_SERVICES:
            if service == "trainer":
                state.processes.extend(start_trainers(state))
            else:
                state.processes.append(start_worker(state, [service], name=service))
        state.processes.append(start_gateway(state, port))
    except BaseException:
        _stop_all(state)
        raise
    state.save()
    return state


def restart_worker(home: Path, name: str) -> ManagedProcess:
    """Start the worker ``name`` (a service, or ``trainer-gpu<N>``) again after it died and record its new PID."""
    state = load_state(home.resolve())
    if state is None:
        raise RuntimeError(f"no stack is running from {home}")
    if state.mode == "embedded":
        services, name, gpus = list(WORKER_SERVICES), "worker", None
    else:
        known = next((p for p in state.processes if p.name == name), None)
        services, gpus = [name.split("-gpu")[0]], known.gpus if known is not None else None
    process = start_worker(state, services, name=name, gpus=gpus)
    state.processes = [p for p in state.processes if p.name != name] + [process]
    state.save()
    return process


def _stop_all(state: StackState) -> list[str]:
    stopped = []
    # gateway first (no new work), then workers (they checkpoint on SIGTERM), then the servers
    for process in sorted(state.processes, key=lambda p: {"gateway": 0, "seaweedfs": 2}.get(p.name, 1)):
        stop(process.pid)
        stopped.append(process.name)
    return stopped


def down(home: Path) -> list[str]:
    state = load_state(home.resolve())
    if state is None:
        return []
    stopped = _stop_all(state)
    state_path(Path(state.home)).unlink(missing_ok=True)
    return stopped
