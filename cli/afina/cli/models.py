"""``afina export`` and ``afina pull``: a registered model exported again, and its files downloaded.

``export`` asks ``POST /v1/models/{model}/exports`` (other quantizations, Ollama, the Hub) and follows the
export's events until it ends. ``pull`` downloads one GGUF through ``GET /v1/models/{model}/files/{file}``,
resuming a partial file with an HTTP range request and checking the sha256 the manifest recorded, so a
multi-GB download that breaks is continued, never silently truncated.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from afina.cli.datasets import CliError

POLL_S = 1.0
TERMINAL = ("succeeded", "failed", "cancelled")
CHUNK = 1024 * 1024


def _client(base_url: str, api_key: str) -> httpx.Client:
    return httpx.Client(base_url=base_url.removesuffix("/v1").removesuffix("/"),
                        headers={"Authorization": f"Bearer {api_key}"}, timeout=httpx.Timeout(60, read=600))


def _checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise CliError(f"{response.status_code}: {message}")
    return response.json()


def export_options(quantizations: list[str], serve: str | None, ollama: bool, ollama_name: str | None,
                   hub: str | None, public: bool) -> dict[str, Any]:
    """The ``ExportOptions`` body the flags describe (the server checks it: one set of rules)."""
    options: dict[str, Any] = {}
    if quantizations:
        options["quantizations"] = [name.lower() for name in quantizations]
    if serve:
        options["serve"] = serve.lower()
    if ollama or ollama_name:
        options["ollama"] = {"name": ollama_name} if ollama_name else True
    if hub:
        options["hub"] = {"repo": hub, "private": not public}
    return options


def run_export(base_url: str, api_key: str, model: str, options: dict[str, Any], *, out: TextIO | None = None,
               timeout_s: float = 24 * 3600) -> dict[str, Any]:
    """Start the export, print its events as they come, and return the finished export object."""
    out = out or sys.stdout  # read now: a default bound at import would keep a replaced stdout
    with _client(base_url, api_key) as client:
        export = _checked(client.post(f"/v1/models/{model}/exports", json=options))
        print(f"export {export['id']} of {model} queued", file=out)
        return follow(client, f"/v1/models/{model}/exports/{export['id']}/events",
                      f"/v1/models/{model}/exports/{export['id']}", out=out, timeout_s=timeout_s, poll_s=POLL_S)


def follow(client: httpx.Client, events_path: str, object_path: str, *, out: TextIO, timeout_s: float,
           poll_s: float) -> dict[str, Any]:
    """Print a job's new events as they come until its object (at ``object_path``) is finished or the time is up;
    returns the last object read."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        events = _checked(client.get(events_path, params={"limit": 100}))["data"]
        for event in reversed(events):
            if event["id"] not in seen:
                seen.add(event["id"])
                print(f"  {event['message']}", file=out)
        current = _checked(client.get(object_path))
        if current["status"] in TERMINAL or time.monotonic() > deadline:
            return current
        time.sleep(poll_s)


def pull(base_url: str, api_key: str, model: str, variant: str | None, target: Path, *,
         out: TextIO | None = None) -> Path:
    """Download the model's GGUF of ``variant`` (default: the served one) to ``target``, resuming a partial one."""
    out = out or sys.stdout  # read now: a default bound at import would keep a replaced stdout
    with _client(base_url, api_key) as client:
        files = _checked(client.get(f"/v1/models/{model}/files"))["data"]
        ggufs = [item for item in files if item["kind"] == "gguf"]
        wanted = [item for item in ggufs if (item["variant"] == variant.lower() if variant else item["served"])]
        if not wanted:
            raise CliError(f"{model} has no {variant or 'served'} GGUF; it has: "
                           f"{', '.join(item['variant'] for item in ggufs)} (afina export {model} --quant ... "
                           f"makes others)")
        item = wanted[0]
        partial = target.with_name(target.name + ".part")
        have = partial.stat().st_size if partial.exists() else 0
        if have > item["bytes"]:
            partial.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        if have < item["bytes"]:
            with client.stream("GET", item["download_url"], headers=headers) as response:
                if response.status_code not in (200, 206):
                    response.read()
                    _checked(response)
                mode = "ab" if response.status_code == 206 else "wb"
                with partial.open(mode) as handle:
                    for chunk in response.iter_bytes(CHUNK):
                        handle.write(chunk)
        _check_digest(partial, item)
        partial.replace(target)
        print(f"{target} ({item['bytes']:,} bytes, {item['variant']}, sha256 {item['sha256'][:12]}…)", file=out)
        return target


def _check_digest(path: Path, item: dict[str, Any]) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    if path.stat().st_size != item["bytes"] or digest.hexdigest() != item["sha256"]:
        path.unlink()
        raise CliError(f"the downloaded {item['filename']} does not match its sha256; it was removed, run the "
                       "pull again")
