"""A real Prometheus (Debian's ``prometheus`` package, installed by ``make install``) scraping the processes of
``afina up --services`` every second, with afina's alert rules loaded, and its HTTP API."""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from afina.deploy.processes import ManagedProcess, free_port, http_ok, spawn, wait_ready
from afina.deploy.runner import WORKER_SERVICES, StackState

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"


@dataclass
class PrometheusServer:
    process: ManagedProcess
    url: str
    jobs: list[str]  # one scrape job per afina service, named as the compose file names them
    started_at: float

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value of a query that aggregates to one series, None when it has none."""
        result = self.query(expr, at)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", timeout=10) as reply:
            return json.loads(reply.read())["data"]


def scrape_config(state: StackState) -> dict:
    """Each afina process of the stack as its own scrape job: the gateway on its HTTP port, each worker on its
    metrics port (AFINA_METRICS_PORT)."""
    scrape_configs = []
    for process in state.processes:
        if process.name == "gateway" or process.name in WORKER_SERVICES:
            scrape_configs.append({"job_name": process.name,
                                   "static_configs": [{"targets": [f"127.0.0.1:{process.port}"]}]})
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in sorted(RULES.glob("*.yml"))],
            "scrape_configs": scrape_configs}


def start_prometheus(state: StackState, folder: Path) -> PrometheusServer:
    import time

    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is not installed: run `make install`"
    folder.mkdir(parents=True, exist_ok=True)
    config = scrape_config(state)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = spawn("prometheus", [binary, f"--config.file={folder / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                    {"PATH": "/usr/bin:/bin"}, folder, port=port, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, lambda: http_ok(f"{url}/-/ready"), 60)
    return PrometheusServer(process=process, url=url, jobs=[c["job_name"] for c in config["scrape_configs"]],
                            started_at=time.time())
