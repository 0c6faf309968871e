"""``afina push`` and ``afina report``: upload a dataset with its ingest options, then show what ingest made of it.

The options are the same ``IngestOptions`` the API takes (the ``ingest_options`` form
field): read from a YAML/JSON file (``--options``), overlaid by flags, validated here first
so a typo fails before any byte is sent. The upload is a plain multipart POST with the
options before the file, so the server's first look at the file already knows them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx
import yaml
from pydantic import ValidationError

from afina.core.datasets.options import IngestOptions

POLL_S = 1.0


class CliError(SystemExit):
    """A user mistake the CLI explains and exits 2 on."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def parse_split(text: str) -> dict[str, float]:
    """``treino=0.8,validacao=0.1,teste=0.1`` → ``{"treino": 0.8, ...}`` (names checked by IngestOptions)."""
    proportions: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--split: {part!r} is not name=proportion (e.g. treino=0.8,validacao=0.1,teste=0.1)")
        try:
            proportions[name.strip()] = float(value)
        except ValueError:
            raise CliError(f"--split: {value!r} is not a number") from None
    return proportions


def build_options(options_file: Path | None = None, *, format: str | None = None,  # noqa: A002
                  system_prompt: str | None = None, split: str | None = None, strict: bool = False,
                  base_model: str | None = None) -> IngestOptions | None:
    """The ingest options from a file and flags; None when nothing was asked (server defaults)."""
    values: dict[str, Any] = {}
    if options_file is not None:
        try:
            loaded = yaml.safe_load(options_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise CliError(f"--options {options_file}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise CliError(f"--options {options_file}: expected a mapping of ingest options")
        values.update(loaded or {})
    if format:
        values["format"] = format
    if system_prompt is not None:
        values["system_prompt"] = system_prompt
    if split:
        values["split"] = {**(values.get("split") or {}), "proportions": parse_split(split)}
    if strict:
        values["mode"] = "strict"
    if base_model:
        values["base_model"] = base_model
    if not values:
        return None
    try:
        return IngestOptions.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "options"
        raise CliError(f"invalid ingest option {where}: {str(first.get('msg')).removeprefix('Value error, ')}") \
            from None


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


def _raise_for_api_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
        param = error.get("param") if isinstance(error, dict) else None
    except ValueError:
        message, param = response.text[:500], None
    where = f" [{param}]" if param else ""
    raise CliError(f"afina answered {response.status_code}: {message}{where}")


def push_file(base_url: str, api_key: str, path: Path, options: IngestOptions | None,
              timeout: float = 600) -> dict[str, Any]:
    """Upload ``path`` as a fine-tune file (streamed); returns the file object."""
    data = {"purpose": "fine-tune"}
    if options is not None:
        data["ingest_options"] = options.model_dump_json(exclude_unset=True)
    with open(path, "rb") as handle:
        response = httpx.post(f"{base_url.rstrip('/')}/files", data=data, files={"file": (path.name, handle)},
                              headers=_headers(api_key), timeout=timeout)
    _raise_for_api_error(response)
    return response.json()


def get_ingest(base_url: str, api_key: str, file_id: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url.rstrip('/')}/files/{file_id}/ingest", headers=_headers(api_key), timeout=60)
    _raise_for_api_error(response)
    return response.json()


def download_report(base_url: str, api_key: str, file_id: str, target: Path) -> int:
    """Stream the report JSONL to ``target``; returns the bytes written."""
    written = 0
    with httpx.stream("GET", f"{base_url.rstrip('/')}/files/{file_id}/ingest/report", headers=_headers(api_key),
                      timeout=600) as response:
        if response.status_code >= 400:
            response.read()
            _raise_for_api_error(response)
        with open(target, "wb") as handle:
            for chunk in response.iter_bytes():
                handle.write(chunk)
                written += len(chunk)
    return written


def wait_for_ingest(base_url: str, api_key: str, file_id: str, out: TextIO | None = None,
                    poll_s: float = POLL_S, timeout_s: float = 24 * 3600) -> dict[str, Any]:
    """Poll until the file is ``processed`` or ``error``, printing progress as it changes."""
    out = out or sys.stdout  # read now: a default bound at import would keep a replaced stdout
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        status = get_ingest(base_url, api_key, file_id)
        progress = status.get("progress") or {}
        line = (f"  ingest: {progress.get('rows', 0)} rows read, {progress.get('examples', 0)} examples kept, "
                f"{progress.get('issues', 0)} issue(s)") if progress else "  ingest: waiting for a worker"
        if line != last:
            out.write(line + "\n")
            out.flush()
            last = line
        if status["status"] in ("processed", "error"):
            return status
        if time.monotonic() > deadline:
            raise CliError(f"ingest of {file_id} did not finish in {timeout_s:.0f}s; see `afina report {file_id}`")
        time.sleep(poll_s)


def format_report(status: dict[str, Any], base_url: str) -> str:
    """A short, readable summary of an ingest status (what ``afina report`` prints)."""
    lines = [f"file {status['file_id']}: {status['status']}"]
    if status.get("status_details"):
        lines.append(f"  {status['status_details']}")
    counts = status.get("counts") or {}
    if counts:
        lines.append("  counts: " + ", ".join(f"{name} {value}" for name, value in counts.items()))
    splits = status.get("splits") or {}
    if splits:
        lines.append("  splits: " + ", ".join(f"{name} {value}" for name, value in splits.items()))
    issues = status.get("issues") or {}
    if issues:
        lines.append("  issues by rule:")
        for rule, actions in issues.items():
            lines.append(f"    {rule}: " + ", ".join(f"{count} {action}" for action, count in actions.items()))
    for error in (status.get("first_errors") or [])[:5]:
        lines.append(f"  error: {error['file']}, line {error['line']}, field {error['field']}: {error['detail']} "
                     f"[{error['rule']}]")
    root = base_url.rstrip("/")
    artifacts = status.get("artifacts") or {}
    if artifacts.get("report"):
        lines.append(f"  report : {root.removesuffix('/v1')}{artifacts['report']}")
        lines.append(f"  (download it: afina report {status['file_id']} --download report.jsonl)")
    return "\n".join(lines)
