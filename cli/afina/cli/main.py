"""``afina``: start and stop the stack, manage API keys, push data and read its report, run and watch jobs, chat."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from afina.cli.client import connection, default_home, openai_client


def _up(args: argparse.Namespace) -> int:
    from afina.deploy.runner import load_state, up_embedded, up_services

    existing = load_state(args.home)
    if existing is not None:
        print(f"afina is already running ({existing.mode}) at {existing.base_url}; `afina down` first")
        return 1
    start = up_services if args.services else up_embedded
    state = start(args.home, port=args.port, tenant=args.tenant)
    print(f"afina is up ({state.mode})")
    print(f"  base URL : {state.base_url}")
    print(f"  API key  : {state.api_key}")
    print(f"  logs     : {Path(state.home) / 'logs'}")
    print(f"  try      : OPENAI_BASE_URL={state.base_url} OPENAI_API_KEY={state.api_key} python -c "
          "\"import openai; print([m.id for m in openai.OpenAI().models.list()])\"")
    return 0


def _down(args: argparse.Namespace) -> int:
    from afina.deploy.runner import down

    stopped = down(args.home)
    print("stopped: " + ", ".join(stopped) if stopped else f"nothing was running from {args.home}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from afina.deploy.processes import alive
    from afina.deploy.runner import load_state

    state = load_state(args.home)
    if state is None:
        print(f"not running (home {args.home})")
        return 1
    print(f"{state.mode} at {state.base_url}")
    for process in state.processes:
        pinned = f"  GPU {process.gpus}" if process.gpus else ""
        print(f"  {process.name:14} pid {process.pid:<8} {'up' if alive(process.pid) else 'DOWN'}  {process.log}"
              f"{pinned}")
    running = _running_stages(args)
    if running:
        print("running:")
        for line in running:
            print(f"  {line}")
    return 0


def _running_stages(args: argparse.Namespace) -> list[str]:
    """One line per stage a worker holds now: the job, its stage, the GPU it runs on (if pinned)."""
    from sqlalchemy import select

    from afina.core.db import repository as repo
    from afina.core.db.models import Job
    from afina.core.queue.jobs import owner_gpus

    runtime = _registry(args)
    try:
        with runtime.db.session() as session:
            jobs = session.scalars(select(Job).where(Job.status.in_(repo.ACTIVE_STATUSES),
                                                     Job.lease_owner.is_not(None)).order_by(Job.created_at)).all()
            lines = []
            for job in jobs:
                gpus = owner_gpus(job.lease_owner)
                where = f"GPU {gpus}" if gpus else "no GPU"
                placement = f" (class {job.gpu_class})" if job.gpu_class else ""
                lines.append(f"{job.id} {job.stage:8} {where}{placement}  tenant {job.tenant_id}")
            return lines
    finally:
        runtime.db.dispose()


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` in seconds (argparse type: a bad one is a usage error)."""
    number, unit = text[:-1], text[-1:].lower()
    if unit not in DURATION_UNITS or not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write a positive number and one of "
                                         "s, m, h, d, w (e.g. 30d, 12h)")
    return int(number) * DURATION_UNITS[unit]


def _registry(args: argparse.Namespace):  # noqa: ANN202 - afina.core.runtime.Runtime, imported late
    """The registry of the stack ``afina up`` started from ``args.home`` (or of that home if none runs)."""
    from afina.core.runtime import Runtime
    from afina.core.settings import Settings
    from afina.deploy.runner import load_state

    state = load_state(args.home)
    overrides = {k: v for k, v in (state.env if state else {}).items() if k.startswith("AFINA_")}
    os.environ.update(overrides)
    os.environ.setdefault("AFINA_HOME", str(args.home))
    return Runtime(Settings())


def _when(epoch: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch)) if epoch is not None else "never"


def _keys_create(args: argparse.Namespace) -> int:
    from afina.core.db import repository as repo
    from afina.core.errors import AfinaError

    expires_at = int(time.time()) + args.expires_in if args.expires_in else None
    try:
        with _registry(args).db.session() as session:
            key = repo.create_api_key(session, args.tenant, name=args.name, expires_at=expires_at,
                                      scopes=args.scopes, requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
    except AfinaError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(key)  # alone on stdout, so a script can capture it
    if expires_at is not None:
        print(f"expires {_when(expires_at)}", file=sys.stderr)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from afina.core.db import repository as repo

    with _registry(args).db.session() as session:
        keys = repo.list_api_keys(session, args.tenant)
    if not keys:
        print("no API keys" + (f" for tenant {args.tenant}" if args.tenant else ""))
        return 0
    print(f"{'PREFIX':12} {'TENANT':16} {'NAME':20} {'CREATED':16} {'EXPIRES':16} {'STATE':8} {'SCOPES':26} "
          "LIMITS/MIN")
    for key in keys:
        limits = f"{key.requests_per_minute or '-'} req, {key.tokens_per_minute or '-'} tok"
        print(f"{key.prefix:12} {key.tenant_id:16} {(key.name or '-'):20} {_when(key.created_at):16} "
              f"{_when(key.expires_at):16} {key.state():8} {','.join(key.scopes):26} {limits}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from afina.core.db import repository as repo
    from afina.core.errors import AfinaError

    try:
        with _registry(args).db.session() as session:
            key = repo.revoke_api_key(session, args.prefix, args.tenant)
    except AfinaError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"revoked {key.prefix} (tenant {key.tenant_id}{', ' + key.name if key.name else ''})")
    return 0


def _push(args: argparse.Namespace) -> int:
    from afina.cli.datasets import CliError, build_options, format_report, push_file, wait_for_ingest

    try:
        options = build_options(args.options, format=args.format, system_prompt=args.system_prompt,
                                split=args.split, strict=args.strict, base_model=args.base_model)
        base_url, api_key = connection(args.home)
        uploaded = push_file(base_url, api_key, Path(args.file), options)
        print(json.dumps(uploaded, indent=2))
        if not args.wait:
            return 0
        status = wait_for_ingest(base_url, api_key, uploaded["id"])
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(format_report(status, base_url))
    return 0 if status["status"] == "processed" else 1


def _report(args: argparse.Namespace) -> int:
    from afina.cli.datasets import CliError, download_report, format_report, get_ingest

    try:
        base_url, api_key = connection(args.home)
        status = get_ingest(base_url, api_key, args.file_id)
        print(format_report(status, base_url))
        if args.download:
            written = download_report(base_url, api_key, args.file_id, args.download)
            print(f"  saved  : {args.download} ({written} bytes)")
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0 if status["status"] != "error" else 1


def _train(args: argparse.Namespace) -> int:
    from afina.cli.jobconfig import job_request, submit_job
    from afina.cli.watch import watch_job
    from afina.core.errors import InvalidRequest

    try:
        request = job_request(args)  # a bad config fails here, naming file, line and field
        client = openai_client(args.home)
        job = submit_job(client, request)
    except InvalidRequest as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"job {job.id} created")
    if args.detach:
        return 0
    job = watch_job(client, job.id)
    print(f"job {job.id} {job.status}" + (f": {job.fine_tuned_model}" if job.fine_tuned_model else ""))
    if job.error and job.error.message:
        print(f"error: {job.error.message}")
    return 0 if job.status == "succeeded" else 1


def _watch(args: argparse.Namespace) -> int:
    from afina.cli.watch import watch_job

    job = watch_job(openai_client(args.home), args.job_id)
    print(f"job {job.id} {job.status}")
    return 0 if job.status == "succeeded" else 1


def _chat(args: argparse.Namespace) -> int:
    client = openai_client(args.home)
    stream = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": args.prompt}],
                                            max_tokens=args.max_tokens, temperature=args.temperature, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            sys.stdout.write(chunk.choices[0].delta.content)
            sys.stdout.flush()
    print()
    return 0


def _export(args: argparse.Namespace) -> int:
    from afina.cli.datasets import CliError
    from afina.cli.models import export_options, run_export

    try:
        base_url, api_key = connection(args.home)
        options = export_options(args.quant, args.serve, args.ollama, args.ollama_name, args.hub, args.public)
        export = run_export(base_url, api_key, args.model, options)
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    published = export.get("published") or {}
    for where, record in published.items():
        if record:
            print(f"{where}: {record.get('status')} {record.get('name') or record.get('url') or ''} "
                  f"{record.get('error') or ''}".rstrip())
    print(f"export {export['id']} {export['status']}")
    return 0 if export["status"] == "succeeded" else 1


def _eval(args: argparse.Namespace) -> int:
    from afina.cli.datasets import CliError
    from afina.cli.evaluation import comparison_table, run_evaluation

    def names(text: str | None) -> list[str] | None:
        return [name.strip() for name in text.split(",") if name.strip()] if text else None

    try:
        base_url, api_key = connection(args.home)
        evaluation = run_evaluation(base_url, api_key, args.model, data=Path(args.data) if args.data else None,
                                    compare=names(args.compare), metrics=names(args.metrics),
                                    labels=names(args.labels), judge=args.judge, rubric=args.rubric)
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(comparison_table(evaluation))
    return 0


def _pull(args: argparse.Namespace) -> int:
    from afina.cli.datasets import CliError
    from afina.cli.models import pull

    try:
        base_url, api_key = connection(args.home)
        target = args.output or Path(f"{args.model.replace(':', '_')}-{args.quant or 'served'}.gguf")
        pull(base_url, api_key, args.model, args.quant, target)
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def _routes(args: argparse.Namespace) -> int:
    import json

    from afina.cli import routes
    from afina.cli.datasets import CliError

    try:
        base_url, api_key = connection(args.home)
        if args.routes_command == "list":
            for route in routes.list_routes(base_url, api_key):
                print(routes.describe(route))
        elif args.routes_command == "show":
            print(json.dumps(routes.get_route(base_url, api_key, args.name), indent=2, ensure_ascii=False))
        elif args.routes_command == "delete":
            routes.delete_route(base_url, api_key, args.name)
            print(f"deleted {args.name}")
        else:
            from afina.cli.captures import with_capture

            spec = with_capture(routes.route_spec(args.target, args.fallback, args.system, args.option, args.timeout,
                                                  args.file), args)
            print(routes.describe(routes.set_route(base_url, api_key, args.name, spec)))
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    from afina.core.keys import ALL_SCOPES

    parser = argparse.ArgumentParser(prog="afina", description=__doc__)
    parser.add_argument("--home", type=Path, default=default_home(), help="state directory (AFINA_HOME)")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start afina in the background on loopback")
    mode = up.add_mutually_exclusive_group()
    mode.add_argument("--embedded", action="store_true", help="one machine, no servers (default)")
    mode.add_argument("--services", action="store_true", help="each service its own process + Redis/PostgreSQL/S3")
    up.add_argument("--port", type=int, default=None)
    up.add_argument("--tenant", default="default")
    up.set_defaults(run=_up)

    commands.add_parser("down", help="stop what `afina up` started").set_defaults(run=_down)
    commands.add_parser("status", help="show the running stack").set_defaults(run=_status)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a tenant (if new) and an API key for it")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default=None, help="what the key is for (shown by `keys list`)")
    create.add_argument("--expires-in", type=parse_duration, default=None, metavar="DURATION",
                        help="the key stops working after this long: 30d, 12h, 90m, 2w (default: never)")
    create.add_argument("--scope", action="append", choices=ALL_SCOPES, default=None, dest="scopes",
                        help="what the key may do (repeatable; default: all): inference, fine-tune, admin")
    create.add_argument("--rpm", type=int, default=None, help="requests per minute (default: the gateway's)")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute (default: the gateway's)")
    create.set_defaults(run=_keys_create)
    listing = keys.add_parser("list", help="every key's prefix, tenant, name, dates and state (never the key)")
    listing.add_argument("--tenant", default=None, help="only this tenant's keys")
    listing.set_defaults(run=_keys_list)
    revoke = keys.add_parser("revoke", help="stop a key working, at once and for good")
    revoke.add_argument("prefix", help="the key's prefix as `keys list` shows it (or the whole key)")
    revoke.add_argument("--tenant", default=None, help="only look among this tenant's keys")
    revoke.set_defaults(run=_keys_revoke)

    push = commands.add_parser("push", help="upload a dataset (JSONL, JSON, CSV, Parquet, TXT, ZIP, tar.gz)")
    push.add_argument("file")
    push.add_argument("--format", default=None, help="openai, sharegpt, alpaca, prompt_completion, text, columns, "
                      "transcript, paired (default: detected)")
    push.add_argument("--options", type=Path, default=None, help="YAML or JSON file of ingest options")
    push.add_argument("--system-prompt", default=None, help="added to examples that have no system message")
    push.add_argument("--split", default=None, help="named proportions, e.g. treino=0.8,validacao=0.1,teste=0.1")
    push.add_argument("--strict", action="store_true", help="fail the file on any bad row (default: drop them)")
    push.add_argument("--base-model", default=None, help="whose tokenizer measures lengths (default: catalog's)")
    push.add_argument("--wait", action="store_true", help="wait for ingest and print its report summary")
    push.set_defaults(run=_push)

    report = commands.add_parser("report", help="show what ingest made of an uploaded file")
    report.add_argument("file_id")
    report.add_argument("--download", type=Path, default=None, help="save the full report (JSONL) here")
    report.set_defaults(run=_report)

    train = commands.add_parser("train", help="start a fine-tuning job and watch it")
    train.add_argument("file", nargs="?", default=None, help="a local JSONL file or an uploaded file id")
    train.add_argument("--config", type=Path, default=None,
                       help="a job YAML (model, training_file, hyperparameters); see configs/examples/")
    train.add_argument("--model", default=None, help="default: the config's, else smollm2-135m-instruct")
    train.add_argument("--suffix", default=None)
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr-multiplier", type=float, default=None)
    train.add_argument("--detach", action="store_true", help="return once the job is created")
    train.set_defaults(run=_train)

    watch = commands.add_parser("watch", help="follow a job until it ends")
    watch.add_argument("job_id")
    watch.set_defaults(run=_watch)

    chat = commands.add_parser("chat", help="ask a model one question (streamed)")
    chat.add_argument("model")
    chat.add_argument("prompt")
    chat.add_argument("--max-tokens", type=int, default=200)
    chat.add_argument("--temperature", type=float, default=0.2)
    chat.set_defaults(run=_chat)

    export = commands.add_parser("export", help="export a fine-tuned model again: quantizations, Ollama, the Hub")
    export.add_argument("model")
    export.add_argument("--quant", action="append", default=[], metavar="NAME",
                        help="a GGUF variant to make (repeatable): f16 bf16 q8_0 q6_k q5_k_m q4_k_m q4_0")
    export.add_argument("--serve", default=None, help="the variant the gateway serves")
    export.add_argument("--ollama", action="store_true", help="register it in the operator's Ollama")
    export.add_argument("--ollama-name", default=None, help="its name there (default: from the suffix)")
    export.add_argument("--hub", default=None, metavar="REPO", help="publish to the Hugging Face Hub (user/repo)")
    export.add_argument("--public", action="store_true", help="a public Hub repository (default: private)")
    export.set_defaults(run=_export)

    evaluate = commands.add_parser("eval", help="evaluate a fine-tuned model against its base and GGUF variants")
    evaluate.add_argument("model")
    evaluate.add_argument("--data", default=None, help="a test file (the training data's format); default: the "
                                                       "job's held-out split")
    evaluate.add_argument("--compare", default=None, metavar="MODELS",
                          help="what to compare the fine-tuned model with, e.g. base,q4_k_m (default: all)")
    evaluate.add_argument("--metrics", default=None, help="comma-separated metrics, the first the main one")
    evaluate.add_argument("--labels", default=None, help="comma-separated label set of a classification task")
    evaluate.add_argument("--judge", nargs="?", const=True, default=False, metavar="MODEL",
                          help="grade every answer with an LLM judge served by the gateway (1-5): the operator's "
                               "judge, or MODEL")
    evaluate.add_argument("--rubric", default=None, help="what the judge grades (default: the task, correctness, "
                                                         "faithfulness to the reference, the question's language)")
    evaluate.set_defaults(run=_eval)

    pull_cmd = commands.add_parser("pull", help="download a fine-tuned model's GGUF (resumes a partial download)")
    pull_cmd.add_argument("model")
    pull_cmd.add_argument("--quant", default=None, help="the variant (default: the served one)")
    pull_cmd.add_argument("-o", "--output", type=Path, default=None)
    pull_cmd.set_defaults(run=_pull)

    routes = commands.add_parser("routes", help="aliases with A/B splits and fallbacks (apps call them by name)")
    routes_commands = routes.add_subparsers(dest="routes_command", required=True)
    routes_commands.add_parser("list", help="every route of your tenant").set_defaults(run=_routes)
    for verb, text in (("show", "one route, as JSON"), ("delete", "remove a route")):
        command = routes_commands.add_parser(verb, help=text)
        command.add_argument("name")
        command.set_defaults(run=_routes)
    put = routes_commands.add_parser("set", help="create a route or replace it (moving an alias is one call)")
    put.add_argument("name")
    put.add_argument("--target", action="append", default=[], metavar="[UPSTREAM::]MODEL[@WEIGHT]",
                     help="a model sharing the traffic by weight (repeat for an A/B split)")
    put.add_argument("--fallback", action="append", default=[], metavar="[UPSTREAM::]MODEL",
                     help="tried in order when the chosen target is down, slow or overloaded")
    put.add_argument("--system", default=None, help="the system prompt when a request has none")
    put.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                     help="a sampling default: temperature, top_p, top_k, max_tokens, stop, seed, repeat_penalty")
    put.add_argument("--timeout", type=float, default=None, help="seconds before the next fallback takes over")
    put.add_argument("-f", "--file", type=Path, default=None, help="the route as YAML or JSON")
    put.set_defaults(run=_routes)
    from afina.cli import captures as capture_cli

    capture_cli.add_capture_flags(put)
    capture_cli.add_commands(routes_commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
