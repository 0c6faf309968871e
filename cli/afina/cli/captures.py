"""``afina routes captures|retrain|feedback`` and the capture flags of ``afina routes set``: a route's kept
exchanges (``/v1/routes/{name}/captures``), their JSONL, a retraining now, and feedback on a completion.

``add_commands`` adds the subcommands to the ``routes`` parser and ``add_capture_flags`` the flags to
``routes set``; ``capture_spec`` turns those flags into the route's ``capture`` section (the server checks it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from afina.cli.datasets import CliError
from afina.cli.models import _checked, _client

REDACTION_KINDS = ("email", "phone", "cpf", "cnpj")


def capture_spec(capture: bool | None, retrain_after: int | None, training_file: str | None,
                 include_feedback: str | None, redact: list[str] | None,
                 current: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``capture`` section the flags describe, over ``current`` (a route file's); None when no flag and no
    file says anything (the route keeps nothing)."""
    section = dict(current or {})
    if capture is not None:
        section["enabled"] = capture
    for name, value in (("retrain_after", retrain_after), ("training_file", training_file),
                        ("include_feedback", include_feedback)):
        if value is not None:
            section[name] = value
    if redact is not None:
        section["redact"] = [] if redact == ["none"] else redact
    if not section and capture is None:
        return None
    return section


def with_capture(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``spec`` (from ``routes.route_spec``) with the capture flags of ``routes set`` applied."""
    section = capture_spec(args.capture, args.retrain_after, args.capture_training_file, args.include_feedback,
                           args.redact, spec.get("capture"))
    return {**spec, "capture": section} if section is not None else spec


def list_captures(base_url: str, api_key: str, name: str, *, limit: int = 20,
                  after: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
    with _client(base_url, api_key) as client:
        return _checked(client.get(f"/v1/routes/{name}/captures", params=params))


def describe(item: dict[str, Any]) -> str:
    """One line per exchange: id, feedback, the job that used it, the last user message and the answer."""
    question = next((message["content"] for message in reversed(item["messages"]) if message["role"] == "user"), "")
    answer = item["correction"] if item.get("correction") is not None else item["answer"]
    feedback = {"up": "+", "down": "-"}.get(item.get("feedback") or "", " ")
    used = item.get("used_in_job") or "-"
    return f"{item['completion_id']} {feedback} {used}  {_short(question)} => {_short(answer)}"


def _short(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def download(base_url: str, api_key: str, name: str, output: Path, *, unused: bool = False,
             include_feedback: str | None = None) -> int:
    """Write the route's captured exchanges as chat JSONL to ``output``; how many examples."""
    params: dict[str, Any] = {"unused": str(unused).lower(),
                              **({"include_feedback": include_feedback} if include_feedback else {})}
    with _client(base_url, api_key) as client:
        response = client.get(f"/v1/routes/{name}/captures/content", params=params)
        if response.status_code >= 400:
            _checked(response)
    output.write_bytes(response.content)
    return sum(1 for line in response.content.splitlines() if line.strip())


def retrain(base_url: str, api_key: str, name: str) -> dict[str, Any]:
    with _client(base_url, api_key) as client:
        return _checked(client.post(f"/v1/routes/{name}/retrain"))


def feedback(base_url: str, api_key: str, completion_id: str, rating: str,
             correction: str | None = None) -> dict[str, Any]:
    with _client(base_url, api_key) as client:
        return _checked(client.post(f"/v1/chat/completions/{completion_id}/feedback",
                                    json={"rating": rating, "correction": correction}))


def run(args: argparse.Namespace) -> int:
    """``afina routes captures|retrain|feedback``."""
    from afina.cli.client import connection

    try:
        base_url, api_key = connection(args.home)
        if args.routes_command == "captures":
            if args.output is not None:
                count = download(base_url, api_key, args.name, args.output, unused=args.unused,
                                 include_feedback=args.include_feedback)
                print(f"wrote {count} examples to {args.output}")
            else:
                page = list_captures(base_url, api_key, args.name, limit=args.limit, after=args.after)
                for item in page["data"]:
                    print(describe(item))
                if page["has_more"]:
                    print(f"(more: --after {page['last_id']})")
        elif args.routes_command == "retrain":
            job = retrain(base_url, api_key, args.name)
            print(f"started {job['id']} ({job['model']}, {job['metadata']['afina_captured']} captured examples); "
                  f"follow it with `afina watch {job['id']}`")
        else:
            item = feedback(base_url, api_key, args.completion_id, args.rating, args.correction)
            print(describe(item))
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def add_commands(routes_commands: Any) -> None:
    """``captures``, ``retrain`` and ``feedback`` under ``afina routes`` (``routes_commands``: its subparsers)."""
    captures = routes_commands.add_parser("captures", help="a route's kept exchanges, or with -o their JSONL")
    captures.add_argument("name")
    captures.add_argument("-o", "--output", type=Path, default=None, help="write the exchanges as chat JSONL")
    captures.add_argument("--unused", action="store_true", help="only those no retraining job used yet")
    captures.add_argument("--include-feedback", choices=["all", "positive"], default=None,
                          help="override the route's setting for the JSONL")
    captures.add_argument("--limit", type=int, default=20)
    captures.add_argument("--after", default=None, help="the last id of the previous page")
    captures.set_defaults(run=run)
    retrain_cmd = routes_commands.add_parser("retrain", help="start a fine-tuning job on the route's captured "
                                                             "exchanges now (the route is not moved)")
    retrain_cmd.add_argument("name")
    retrain_cmd.set_defaults(run=run)
    feedback_cmd = routes_commands.add_parser("feedback", help="rate a completion of a route with capture on")
    feedback_cmd.add_argument("completion_id", help="chatcmpl-… (or the bare id)")
    feedback_cmd.add_argument("rating", choices=["up", "down"])
    feedback_cmd.add_argument("--correction", default=None, help="the answer it should have been")
    feedback_cmd.set_defaults(run=run)


def add_capture_flags(put: argparse.ArgumentParser) -> None:
    """The capture flags of ``afina routes set`` (see ``with_capture``)."""
    put.add_argument("--capture", action=argparse.BooleanOptionalAction, default=None,
                     help="keep the route's chats (redacted) for retraining")
    put.add_argument("--retrain-after", type=int, default=None, metavar="N",
                     help="start a fine-tuning job after N new captured exchanges (at least 10)")
    put.add_argument("--capture-training-file", default=None, metavar="FILE_ID",
                     help="trained on with the captured data (default: the first target's own training file)")
    put.add_argument("--include-feedback", choices=["all", "positive"], default=None,
                     help="positive: leave out answers thumbed down without a correction")
    put.add_argument("--redact", nargs="+", choices=[*REDACTION_KINDS, "none"], default=None,
                     help="what is replaced before anything is stored (default: all four)")
