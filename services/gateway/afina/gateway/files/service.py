"""File logic, callable without HTTP: store a checked upload, list, fetch, delete.

An upload becomes visible only once both its object and its row exist: the object
is written first, and removed again if the row cannot be committed.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from pydantic import ValidationError

from afina.core import ids
from afina.core.batches import BATCH_INPUT_PURPOSE, BATCH_OUTPUT_PURPOSE
from afina.core.catalog import check_model_access, resolve_base_model
from afina.core.catalog.access import STORE_SCHEME, is_local_reference
from afina.core.datasets.key_env import KEY_ENV_PARAM, check_key_env_allowed
from afina.core.datasets.layout import raw_file_key
from afina.core.datasets.options import IngestOptions
from afina.core.datasets.sniff import UploadSniffer, check_archive
from afina.core.db import repository as repo
from afina.core.db.models import File
from afina.core.errors import InvalidRequest
from afina.core.file_expiry import BATCH_FILE_EXPIRES_AFTER_S, ExpiresAfter
from afina.core.keys import KeyGrant, Scope
from afina.core.metrics import FILES_UPLOADED_BYTES
from afina.core.queue import outbox
from afina.core.runtime import Runtime
from afina.gateway.deps import check_scope
from afina.gateway.files.protocol import FILE_PURPOSES, FileList, FileObject
from afina.gateway.files.upload import SpooledUpload
from afina.gateway.params import check_no_nul

log = logging.getLogger("afina.gateway")
OPTIONS_FIELD = "ingest_options"
EXPIRES_FIELD = "expires_after"  # the openai client sends it as expires_after[anchor] and expires_after[seconds]

# Who may upload and read a file, by its purpose: a batch's input and its output and error files are part of
# using models (OpenAI counts them as batch usage), so the inference scope opens them; training data and the
# results of jobs stay with the fine-tune scope. A key with either scope gets into /v1/files.
BATCH_FILE_SCOPES: tuple[Scope, ...] = ("inference", "fine-tune")
FINE_TUNE_FILE_SCOPES: tuple[Scope, ...] = ("fine-tune",)
FILES_SCOPES = BATCH_FILE_SCOPES


def scopes_for(purpose: str) -> tuple[Scope, ...]:
    return BATCH_FILE_SCOPES if purpose in (BATCH_INPUT_PURPOSE, BATCH_OUTPUT_PURPOSE) else FINE_TUNE_FILE_SCOPES


def check_file_scope(caller: KeyGrant | None, purpose: str) -> None:
    """403 when ``caller`` may not upload or read files of ``purpose`` (no caller: a worker, always allowed)."""
    if caller is not None:
        check_scope(caller, scopes_for(purpose), f"needed for files of purpose {purpose!r}")


def check_purpose(fields: dict[str, str], *, required: bool) -> None:
    """Refuse a purpose afina does not serve (``fine-tune`` and ``batch``)."""
    purpose = fields.get("purpose")
    if purpose is None:
        if required:
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
        return
    if purpose not in FILE_PURPOSES:
        raise InvalidRequest(f"Invalid 'purpose': {purpose!r}; afina accepts {list(FILE_PURPOSES)}.",
                             param="purpose")


def parse_expires_after(fields: dict[str, str]) -> ExpiresAfter | None:
    """The upload's ``expires_after`` (None when not sent): the ``expires_after[anchor]`` and
    ``expires_after[seconds]`` form fields the openai client sends, or one ``expires_after`` field holding a JSON
    object; a 400 naming the bad part (``expires_after.seconds``) otherwise, with OpenAI's limits."""
    parts: dict[str, object] = {}
    sent = False
    for name, value in fields.items():
        if name == EXPIRES_FIELD:
            sent = True
            try:
                whole = orjson.loads(value)
            except orjson.JSONDecodeError:
                whole = None
            if not isinstance(whole, dict):
                raise InvalidRequest(f"Invalid '{EXPIRES_FIELD}': send the form fields expires_after[anchor] and "
                                     f"expires_after[seconds] (or a JSON object).", param=EXPIRES_FIELD)
            parts.update(whole)
        elif name.startswith(f"{EXPIRES_FIELD}[") and name.endswith("]"):
            sent = True
            parts[name[len(EXPIRES_FIELD) + 1:-1]] = value
    if not sent:
        return None
    seconds = parts.get("seconds")
    if isinstance(seconds, str) and re.fullmatch(r"[+-]?[0-9]+", seconds.strip()):
        parts["seconds"] = int(seconds)  # a form field is text; the number itself is checked strictly below
    try:
        return ExpiresAfter.model_validate(parts)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first.get("loc", ()))
        param = f"{EXPIRES_FIELD}.{location}" if location else EXPIRES_FIELD
        if first.get("type") == "missing":
            raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param) from None
        raise InvalidRequest(f"Invalid '{param}': {first.get('msg', 'invalid value')}.", param=param) from None


def parse_ingest_options(text: str, runtime: Runtime | None = None, tenant_id: str | None = None) -> IngestOptions:
    """The ``ingest_options`` form field (JSON of ``IngestOptions``); a 400 naming the bad field otherwise.

    With ``runtime`` and ``tenant_id`` it is also checked against what the tenant may name
    (``check_ingest_options``); without them only a catalog ``base_model`` is, and ``store_upload``
    checks the rest before anything is stored.
    """
    try:
        options = IngestOptions.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first.get("loc", ()))
        param = f"{OPTIONS_FIELD}.{location}" if location else OPTIONS_FIELD
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message = f"not valid JSON ({first.get('ctx', {}).get('error', message)})"
        more = f" ({len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        raise InvalidRequest(f"Invalid '{param}': {message}.{more}", param=param) from None
    if runtime is not None and tenant_id is not None:
        check_ingest_options(runtime, tenant_id, options)
    elif options.base_model is not None and not _needs_tenant(options.base_model):
        with _as_option("base_model"):
            resolve_base_model(options.base_model)
    return options


def _needs_tenant(base_model: str) -> bool:
    """A path or a store model is checked against the tenant and the operator's settings, never without."""
    return is_local_reference(base_model) or base_model.startswith(STORE_SCHEME)


@contextmanager
def _as_option(name: str) -> Iterator[None]:
    """An ``InvalidRequest`` about a model or key, re-raised naming the ``ingest_options`` field it came from."""
    try:
        yield
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, param=f"{OPTIONS_FIELD}.{name}", code=exc.code) from None


def check_ingest_options(runtime: Runtime, tenant_id: str, options: IngestOptions | None) -> None:
    """What ``tenant_id`` may name in ingest options: its base model (as a job's ``model``: its own or the
    operator's store models, paths only under ``allowed_model_dirs``) and its ``encryption.key_env`` (one of
    ``settings.key_envs_for(tenant_id)``). Runs before anything is stored; the worker checks again."""
    if options is None:
        return
    settings = runtime.settings
    check_key_env_allowed(options, settings.key_envs_for(tenant_id), param=f"{OPTIONS_FIELD}.{KEY_ENV_PARAM}")
    if options.base_model is not None:
        with _as_option("base_model"):
            check_model_access(options.base_model, tenant_id, settings.allowed_model_dirs)
            resolve_base_model(options.base_model, store=runtime.store, allowed_model_dirs=settings.allowed_model_dirs)


class UploadForm:
    """The small form fields of an upload, read as they stream in.

    ``ingest_options`` sent before the file lets the sniffer use them (an explicit
    ``container``); sent after it, they are still validated before anything is stored.
    """

    def __init__(self, runtime: Runtime | None = None, tenant_id: str | None = None,
                 caller: KeyGrant | None = None) -> None:
        self.options: IngestOptions | None = None
        self.sniffer: UploadSniffer | None = None
        self.runtime = runtime  # with the tenant: options are checked against what it may name, before the file
        self.tenant_id = tenant_id
        self.caller = caller  # with it, a purpose its key may not upload stops the upload before the file

    def before_file(self, fields: dict[str, str]) -> None:
        check_purpose(fields, required=False)
        parse_expires_after(fields)  # a bad expiry sent first stops the upload before the file
        if "purpose" in fields:
            check_file_scope(self.caller, fields["purpose"])
        if OPTIONS_FIELD in fields:
            self.options = parse_ingest_options(fields[OPTIONS_FIELD], self.runtime, self.tenant_id)

    def checker(self, filename: str) -> UploadSniffer:
        self.sniffer = UploadSniffer(filename, self.options)
        return self.sniffer

    def final_options(self, fields: dict[str, str]) -> IngestOptions | None:
        if self.options is None and OPTIONS_FIELD in fields:
            self.options = parse_ingest_options(fields[OPTIONS_FIELD], self.runtime, self.tenant_id)
        return self.options


CONTROL_CHARACTERS = dict.fromkeys([*range(32), 127])


def stored_filename(name: str) -> str:
    """The upload's name without control characters: a name is for display, and PostgreSQL text holds no NUL
    (a raw ``filename="a\\0b"`` answered 500)."""
    return name.translate(CONTROL_CHARACTERS) or "upload.jsonl"


def store_upload(runtime: Runtime, tenant_id: str, upload: SpooledUpload, options: IngestOptions | None = None,
                 container: str | None = None, *, caller: KeyGrant | None = None) -> FileObject:
    """Move a checked upload into the store, register it, and queue its ingest; the sha256 is the store's own.

    A fine-tune file starts ``uploaded`` and becomes ``processed`` or ``error`` when the ingest
    worker is done with it. A ZIP's members are checked before anything is stored.
    """
    check_purpose(upload.fields, required=True)
    check_file_scope(caller, upload.fields["purpose"])  # a purpose sent after the file is checked here
    expires_after = parse_expires_after(upload.fields)
    check_ingest_options(runtime, tenant_id, options)
    if container == "zip":
        check_archive(upload.path, upload.filename, max_expanded_bytes=runtime.settings.max_archive_expanded_bytes)
    file_id = ids.file_id()
    filename = stored_filename(upload.filename)
    key = raw_file_key(tenant_id, file_id, filename)
    stored_options: dict[str, Any] | None = (options.model_dump(mode="json", exclude_unset=True)
                                             if options is not None else None)
    info = runtime.store.put_file(key, upload.path)
    purpose = upload.fields["purpose"]
    ingested = purpose != BATCH_INPUT_PURPOSE  # a batch's requests are read by its worker, line by line
    # OpenAI's default: a batch file expires after 30 days, other files are kept until deleted
    expires_after_s = (expires_after.seconds if expires_after is not None
                       else BATCH_FILE_EXPIRES_AFTER_S if purpose == BATCH_INPUT_PURPOSE else None)
    try:
        with runtime.db.session() as session:
            row = File(id=file_id, tenant_id=tenant_id, filename=filename, purpose=purpose,
                       bytes=info.size, sha256=info.sha256 or "", object_key=key,
                       status="uploaded" if ingested else "processed", ingest_options=stored_options,
                       ingest_state={"state": "queued"} if ingested else None)
            repo.start_file_clock(session, row, expires_after_s)
            session.add(row)
            messages = [outbox.add_file_ingest(session, file_id)] if ingested else []
    except BaseException:
        runtime.store.delete(key)
        raise
    FILES_UPLOADED_BYTES.inc(info.size)
    outbox.deliver(runtime, messages)  # a broker outage only delays it: the workers' relay sends it later
    return FileObject.from_row(row)


def list_files(runtime: Runtime, tenant_id: str, *, purpose: str | None, after: str | None, limit: int,
               order: str, caller: KeyGrant | None = None) -> FileList:
    """The tenant's files, newest first; with ``caller``, only those its key may read."""
    check_no_nul("purpose", purpose)  # the registry's text cannot hold NUL: a 400, not a failed query
    with runtime.db.session() as session:
        rows = repo.list_files(session, tenant_id, purpose)
    if caller is not None:
        rows = [row for row in rows if any(caller.allows(scope) for scope in scopes_for(row.purpose))]
    if order == "asc":
        rows.reverse()
    if after:
        position = next((index for index, row in enumerate(rows) if row.id == after), None)
        if position is None:
            raise InvalidRequest(f"Invalid 'after': no such file {after!r}.", param="after")
        rows = rows[position + 1:]
    page = [FileObject.from_row(row) for row in rows[:limit]]
    return FileList(data=page, has_more=len(rows) > limit,
                    first_id=page[0].id if page else None, last_id=page[-1].id if page else None)


def get_file(runtime: Runtime, tenant_id: str, file_id: str, *, caller: KeyGrant | None = None) -> File:
    """The tenant's file (404 for another tenant's); with ``caller``, 403 when its key may not read it."""
    check_no_nul("file_id", file_id)
    with runtime.db.session() as session:
        row = repo.get_file(session, tenant_id, file_id)
    check_file_scope(caller, row.purpose)
    return row


def delete_file(runtime: Runtime, tenant_id: str, file_id: str, *, caller: KeyGrant | None = None) -> None:
    """Remove the object, then commit the row's removal (a failed delete leaves both in place)."""
    check_no_nul("file_id", file_id)
    with runtime.db.session() as session:
        row = repo.get_file(session, tenant_id, file_id)
        check_file_scope(caller, row.purpose)
        runtime.store.delete(row.object_key)
        session.delete(row)


def open_content(runtime: Runtime, tenant_id: str, file_id: str, *,
                 caller: KeyGrant | None = None) -> tuple[File, Iterator[bytes]]:
    """The row and its bytes; the first chunk is read here, so a missing object is a 404, not a cut stream."""
    row = get_file(runtime, tenant_id, file_id, caller=caller)
    chunks = runtime.store.iter_chunks(row.object_key)
    first = next(chunks, b"")
    return row, itertools.chain([first], chunks)
