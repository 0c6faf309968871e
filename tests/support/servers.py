"""Real servers for tests, started on loopback and stopped by PID (never by name)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from afina.deploy import processes, seaweedfs
from afina.deploy.processes import free_port  # noqa: F401 - re-exported for tests
from afina.deploy.seaweedfs import SeaweedS3


def port_open(host: str, port: int) -> bool:
    return processes.port_open(port, host)


def wait_until(check: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready")
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def start_seaweedfs(data_dir: Path) -> SeaweedS3:
    """The same SeaweedFS launch ``afina up --services`` uses, with fixed test credentials."""
    return seaweedfs.start_seaweedfs(data_dir, data_dir, dict(os.environ), access_key="afinatest",
                                     secret_key="afinatestsecret")


def ensure_redis() -> str:
    """The machine's Redis if it answers, else one we start (and leave to the caller to stop)."""
    if port_open("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379"
    raise RuntimeError("Redis is not running on 127.0.0.1:6379 (.ci/run starts it)")


def postgres_url(database: str = "test") -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"


@contextmanager
def fresh_postgres_database(admin_url: str, prefix: str = "afina_test") -> Iterator[str]:
    """A brand-new database on the machine's PostgreSQL, dropped afterwards (connections and all)."""
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield postgres_url(name)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class ServedApp:
    """An ASGI app served by uvicorn on a loopback port, in a background thread of this process."""

    server: object  # uvicorn.Server
    thread: object  # threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30) -> None:
        """Ask uvicorn to exit (running the app's shutdown) and wait for the thread."""
        self.server.should_exit = True  # type: ignore[attr-defined]
        self.thread.join(timeout)  # type: ignore[attr-defined]


def serve_app(app: object, timeout: float = 60) -> ServedApp:
    """Start uvicorn for ``app`` on a free port; returns once it accepts connections (lifespan done)."""
    import threading

    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), timeout, "uvicorn")
    if not server.started:
        raise RuntimeError("uvicorn exited before it started (see the log above)")
    return ServedApp(server=server, thread=thread, port=port)


@dataclass
class PrivateRedis:
    """A Redis server of one test's own (AOF on, as production runs it), so the test may stop and restart it
    without disturbing the machine's Redis that other tests share."""

    data_dir: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                   "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)]
        self.process = subprocess.Popen(command, stdout=open(self.data_dir / "redis.log", "ab"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: port_open("127.0.0.1", self.port), 15, "private redis", self.process)
        return self

    def stop(self) -> None:
        """SIGTERM (Redis flushes its AOF on the way out), then wait until the port is closed."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None


def start_private_redis(data_dir: Path) -> PrivateRedis:
    return PrivateRedis(data_dir=data_dir, port=free_port()).start()


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of one test's (or benchmark's) own, so it can be restarted mid-job without touching the
    machine's server that every other test uses. Runs as the ``postgres`` user (initdb refuses root)."""

    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/afina"

    def _as_postgres(self, *command: str) -> None:
        binary = next(Path("/usr/lib/postgresql").glob(f"*/bin/{command[0]}"))
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, str(binary), *command[1:]], check=True, capture_output=True, timeout=120)

    def start(self) -> PrivatePostgres:
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                import shutil

                shutil.chown(self.data_dir, "postgres", "postgres")
            self._as_postgres("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._as_postgres("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.data_dir / "server.log"),
                          "-w", "start")
        return self

    def restart(self) -> None:
        """An abrupt stop (``-m immediate``: the server crashes, dropping every connection) and a start with crash
        recovery, as a database host failing over would look to afina."""
        self._as_postgres("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        self.start()

    def stop(self) -> None:
        try:
            self._as_postgres("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        except subprocess.CalledProcessError:
            pass  # not running


def start_private_postgres() -> PrivatePostgres:
    """A new cluster in a fresh folder under the system temp dir (the ``postgres`` user must reach it)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="afina-pg-"))
    folder.chmod(0o755)
    return PrivatePostgres(data_dir=folder / "data", port=free_port()).start()
