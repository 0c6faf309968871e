"""Start, track and stop background processes by PID (never by name)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ManagedProcess:
    name: str
    pid: int
    log: str
    port: int | None = None
    gpus: str | None = None  # the CUDA devices a trainer is pinned to (CUDA_VISIBLE_DEVICES), when any

    def as_dict(self) -> dict:
        return asdict(self)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def spawn(name: str, command: list[str], env: dict[str, str], log_dir: Path, port: int | None = None,
          cwd: Path | None = None) -> ManagedProcess:
    """Start ``command`` in its own session (so stopping it stops its children), logging to a file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=cwd)
    return ManagedProcess(name=name, pid=process.pid, log=str(log_path), port=port)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def wait_ready(process: ManagedProcess, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not alive(process.pid):
            tail = Path(process.log).read_text(errors="replace")[-2500:]
            raise RuntimeError(f"{process.name} exited before it was ready; end of {process.log}:\n{tail}")
        time.sleep(0.2)
    raise TimeoutError(f"{process.name} not ready after {timeout:.0f}s (log: {process.log})")


def stop(pid: int, timeout: float = 15, sig: int = signal.SIGTERM) -> None:
    """Signal the process group led by ``pid``; SIGKILL it if still there after ``timeout``."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
