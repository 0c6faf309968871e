"""``afina``: start and stop the stack, manage API keys, push data, run and watch jobs, chat."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from afina.cli.client import default_home, openai_client


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
        print(f"  {process.name:10} pid {process.pid:<8} {'up' if alive(process.pid) else 'DOWN'}  {process.log}")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from afina.core.db import repository as repo
    from afina.core.runtime import Runtime
    from afina.core.settings import Settings
    from afina.deploy.runner import load_state

    state = load_state(args.home)
    overrides = {k: v for k, v in (state.env if state else {}).items() if k.startswith("AFINA_")}
    os.environ.update(overrides)
    os.environ.setdefault("AFINA_HOME", str(args.home))
    runtime = Runtime(Settings())
    with runtime.db.session() as session:
        key = repo.create_api_key(session, args.tenant)
    print(key)
    return 0


def _push(args: argparse.Namespace) -> int:
    client = openai_client(args.home)
    with open(args.file, "rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    print(json.dumps(uploaded.model_dump(), indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from afina.cli.watch import watch_job

    client = openai_client(args.home)
    training_file = args.file
    if Path(args.file).exists():
        with open(args.file, "rb") as handle:
            training_file = client.files.create(file=handle, purpose="fine-tune").id
    hyperparameters = {k: v for k, v in (("n_epochs", args.epochs), ("batch_size", args.batch_size),
                                         ("learning_rate_multiplier", args.lr_multiplier)) if v is not None}
    job = client.fine_tuning.jobs.create(model=args.model, training_file=training_file, suffix=args.suffix,
                                         hyperparameters=hyperparameters or None)
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


def build_parser() -> argparse.ArgumentParser:
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
    create.set_defaults(run=_keys_create)

    push = commands.add_parser("push", help="upload a training file")
    push.add_argument("file")
    push.set_defaults(run=_push)

    train = commands.add_parser("train", help="start a fine-tuning job and watch it")
    train.add_argument("file", help="a local JSONL file or an uploaded file id")
    train.add_argument("--model", default="smollm2-135m-instruct")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
