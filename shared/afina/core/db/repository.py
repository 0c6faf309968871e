"""Queries the services share. Each takes a session; tenant scoping is explicit in every read."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, case, delete, func, or_, select, text, update
from sqlalchemy.orm import Session

from afina.core import ids
from afina.core.db.clock import database_time, now_sql
from afina.core.db.models import (
    ApiKey,
    CapturedExchange,
    Checkpoint,
    File,
    Job,
    JobEvent,
    Model,
    Route,
    Tenant,
    now,
)
from afina.core.errors import AuthenticationFailed, Conflict, InvalidRequest, LeaseLost, NotFound
from afina.core.keys import ALL_SCOPES, KeyGrant, Scope, check_scopes

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_STATUSES = frozenset({"validating_files", "queued", "running"})
API_KEY_PREFIX = "afk-"
# an unknown, revoked and expired key get the same answer: a caller learns nothing about which keys exist
INCORRECT_KEY = "incorrect API key provided"
MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>'"


# tenants and keys -----------------------------------------------------------

def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def ensure_tenant(session: Session, tenant_id: str) -> Tenant:
    if not tenant_id or len(tenant_id) > 64 or not all(c.isalnum() or c in "-_" for c in tenant_id):
        raise InvalidRequest("tenant names use letters, digits, '-' and '_' (at most 64)", param="tenant")
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        tenant = Tenant(id=tenant_id)
        session.add(tenant)
        session.flush()
    return tenant


API_KEY_PREFIX_CHARS = 10  # "afk-" and 6 more: enough to tell keys apart, too short to be worth anything
API_KEY_NAME_MAX = 128


@dataclass(frozen=True)
class ApiKeyInfo:
    """What may be shown about a key: never its hash, never its plaintext."""

    prefix: str
    tenant_id: str
    name: str | None
    created_at: int
    expires_at: int | None
    revoked: bool
    revoked_at: int | None  # None for a key revoked before revocation times were kept
    scopes: tuple[Scope, ...] = ALL_SCOPES
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def state(self, moment: float | None = None) -> str:
        """``active``, ``revoked`` or ``expired`` (at ``moment``, default now)."""
        if self.revoked:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (time.time() if moment is None else moment):
            return "expired"
        return "active"


def _key_info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(prefix=row.prefix, tenant_id=row.tenant_id, name=row.name, created_at=row.created_at,
                      expires_at=row.expires_at, revoked=bool(row.revoked or row.revoked_at is not None),
                      revoked_at=row.revoked_at, scopes=_scopes(row), requests_per_minute=row.requests_per_minute,
                      tokens_per_minute=row.tokens_per_minute)


def _scopes(row: ApiKey) -> tuple[Scope, ...]:
    return check_scopes(row.scopes) if row.scopes else ALL_SCOPES


def create_api_key(session: Session, tenant_id: str, *, expires_at: int | None = None,
                   name: str | None = None, scopes: tuple[str, ...] | list[str] | None = None,
                   requests_per_minute: int | None = None, tokens_per_minute: int | None = None) -> str:
    """Create a key for a tenant (made if new); the plaintext is returned once and never stored.

    ``expires_at`` (epoch seconds) ends the key's life by itself; ``name`` says what it is for; ``scopes``
    (default: all) what it may do; the limits how much per minute (default: the gateway's). The key's
    prefix is unique among stored keys, so ``revoke_api_key`` can name it by that alone.
    """
    try:
        granted = list(check_scopes(scopes)) if scopes is not None else None
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="scopes") from None
    for param, limit in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
        if limit is not None and limit < 1:
            raise InvalidRequest(f"{param} is at least 1 (leave it out for the gateway's default)", param=param)
    if name is not None and (not name.strip() or len(name) > API_KEY_NAME_MAX):
        raise InvalidRequest(f"a key's name has 1 to {API_KEY_NAME_MAX} characters", param="name")
    if expires_at is not None and expires_at <= time.time():
        raise InvalidRequest("a key's expiry must lie in the future", param="expires_at")
    ensure_tenant(session, tenant_id)
    while True:
        api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        prefix = api_key[:API_KEY_PREFIX_CHARS]
        if session.scalars(select(ApiKey.prefix).where(ApiKey.prefix == prefix)).first() is None:
            break
    session.add(ApiKey(key_hash=hash_api_key(api_key), prefix=prefix, tenant_id=tenant_id, name=name,
                       expires_at=expires_at, scopes=granted, requests_per_minute=requests_per_minute,
                       tokens_per_minute=tokens_per_minute))
    return api_key


def list_api_keys(session: Session, tenant_id: str | None = None) -> list[ApiKeyInfo]:
    """Every key (of ``tenant_id``, or of all tenants with None), oldest first, revoked and expired too."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.prefix)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    return [_key_info(row) for row in session.scalars(query)]


def revoke_api_key(session: Session, prefix_or_key: str, tenant_id: str | None = None) -> ApiKeyInfo:
    """Revoke the key with this prefix (as ``list_api_keys`` shows it) or this plaintext; it never
    authenticates again. Revoking a revoked key changes nothing. ``tenant_id`` limits the search.
    """
    shown = prefix_or_key[:API_KEY_PREFIX_CHARS]  # a plaintext key is never echoed whole
    if len(prefix_or_key) > API_KEY_PREFIX_CHARS:
        rows = [row for row in [session.get(ApiKey, hash_api_key(prefix_or_key))] if row is not None]
    else:
        rows = list(session.scalars(select(ApiKey).where(ApiKey.prefix == prefix_or_key)))
    if tenant_id is not None:
        rows = [row for row in rows if row.tenant_id == tenant_id]
    if not rows:
        raise NotFound(f"no such API key: {shown}", param="key")
    if len(rows) > 1:  # keys made before prefixes were unique
        raise Conflict(f"{len(rows)} keys start with {shown}; revoke one by its full key", param="key")
    row = rows[0]
    if not row.revoked:
        row.revoked, row.revoked_at = True, now()
    return _key_info(row)


def authenticate_key(session: Session, api_key: str | None) -> KeyGrant:
    """What ``api_key`` grants; ``AuthenticationFailed`` otherwise.

    An unknown, revoked and expired key get the same answer: a caller learns nothing about which keys exist.
    """
    if not api_key:
        raise AuthenticationFailed(MISSING_KEY)
    row = session.get(ApiKey, hash_api_key(api_key))
    if row is None or row.revoked or row.revoked_at is not None:
        raise AuthenticationFailed(INCORRECT_KEY)
    grant = KeyGrant(tenant_id=row.tenant_id, prefix=row.prefix, scopes=_scopes(row),
                     requests_per_minute=row.requests_per_minute, tokens_per_minute=row.tokens_per_minute,
                     expires_at=row.expires_at)
    if grant.expired(time.time()):
        raise AuthenticationFailed(INCORRECT_KEY)
    return grant


def registry_generation(session: Session) -> int:
    """The counter every committed write to api_keys, models or routes moves (migration 0009's triggers): an
    in-memory copy of those rows read at one value is current while the counter still reads the same."""
    return int(session.execute(text("SELECT value FROM registry_generation WHERE id = 1")).scalar_one())


def authenticate(session: Session, api_key: str | None) -> str:
    """The tenant owning ``api_key`` (see ``authenticate_key``)."""
    return authenticate_key(session, api_key).tenant_id


# files ----------------------------------------------------------------------

def file_alive(session: Session) -> ColumnElement[bool]:
    """SQL for "this file has not expired", on the database's clock (``afina.core.file_expiry``)."""
    return or_(File.expires_at.is_(None), File.expires_at > now_sql(session))


def get_file(session: Session, tenant_id: str | None, file_id: str, *, for_update: bool = False,
             include_expired: bool = False) -> File:
    """A file by id; with ``tenant_id`` None the caller is a worker and sees every tenant.

    An expired file answers like a missing one, unless ``include_expired``: the worker of an active job that
    names it still reads it (the sweeper keeps such a file until the job ends).
    """
    query = select(File).where(File.id == file_id)
    if not include_expired:
        query = query.where(file_alive(session))
    if for_update:
        query = query.with_for_update()
    row = session.scalars(query).first()
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound(f"no such file: {file_id}", param="file_id")
    return row


def start_file_clock(session: Session, row: File, expires_after_s: int | None) -> None:
    """``row.created_at`` from the database's clock and, with ``expires_after_s``, ``expires_at`` that many
    seconds later (OpenAI's anchor ``created_at``): every host judges expiry on that one clock."""
    row.created_at = int(database_time(session))
    row.expires_at = row.created_at + expires_after_s if expires_after_s is not None else None


def _needed_by_active_job() -> ColumnElement[bool]:
    """A job not finished names the file as its input: a fine-tune's or an evaluation's training or validation
    file, a batch's input file (``training_file`` of a batch job)."""
    return (select(Job.id).where(Job.status.in_(ACTIVE_STATUSES),
                                 or_(Job.training_file == File.id, Job.validation_file == File.id))
            .exists())


def _sweepable(session: Session) -> ColumnElement[bool]:
    return (File.expires_at.is_not(None)) & (File.expires_at <= now_sql(session)) & ~_needed_by_active_job()


def expired_file_ids(session: Session, limit: int) -> list[str]:
    """Up to ``limit`` expired files that no active job needs, the longest expired first."""
    return list(session.scalars(select(File.id).where(_sweepable(session))
                                .order_by(File.expires_at, File.id).limit(limit)))


def claim_expired_file(session: Session, file_id: str) -> tuple[str, str] | None:
    """Delete the row of an expired file no active job needs, in one conditional statement: (tenant, object
    key) when this session deleted it, None when it is gone, needed, or not expired (any more).

    The caller deletes the object before committing, so a store failure rolls the row back. Of two sweepers,
    the second's statement waits for the first's transaction (PostgreSQL's row lock, SQLite's write lock)
    and then matches nothing.
    """
    result = session.execute(delete(File).where(File.id == file_id, _sweepable(session))
                             .returning(File.tenant_id, File.object_key)
                             .execution_options(synchronize_session=False))
    row = result.first()
    return (row[0], row[1]) if row is not None else None


def add_result_file(session: Session, tenant_id: str, *, object_key: str, filename: str, size: int,
                    sha256: str) -> File:
    """Expose an object a worker wrote (metrics, report) as a file of purpose ``fine-tune-results``.

    Registering the same object again returns the existing file, so a re-run stage adds no duplicate.
    """
    existing = session.scalars(select(File).where(File.tenant_id == tenant_id, File.object_key == object_key)).first()
    if existing is not None:
        existing.bytes, existing.sha256 = size, sha256
        return existing
    row = File(id=ids.file_id(), tenant_id=tenant_id, filename=filename, purpose="fine-tune-results", bytes=size,
               sha256=sha256, object_key=object_key)
    session.add(row)
    return row


def list_files(session: Session, tenant_id: str, purpose: str | None = None) -> list[File]:
    """The tenant's files that have not expired, newest first."""
    query = (select(File).where(File.tenant_id == tenant_id, file_alive(session))
             .order_by(File.created_at.desc(), File.id))
    if purpose:
        query = query.where(File.purpose == purpose)
    return list(session.scalars(query))


# jobs -----------------------------------------------------------------------

def get_job(session: Session, tenant_id: str | None, job_id: str, *, for_update: bool = False) -> Job:
    """A job by id; with ``tenant_id`` None the caller is a worker and sees every tenant."""
    if for_update:
        row = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
    else:
        row = session.get(Job, job_id)
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound(f"no such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return row


def list_jobs(session: Session, tenant_id: str, after: str | None, limit: int,
              kind: str = "fine_tune") -> tuple[list[Job], bool]:
    """Newest first; ``after`` is the id of the last job of the previous page. Fine-tuning jobs by default
    (``/v1/fine_tuning/jobs``); ``kind="export"`` lists re-exports."""
    query = select(Job).where(Job.tenant_id == tenant_id, Job.kind == kind)
    if after:
        anchor = get_job(session, tenant_id, after)
        query = query.where(or_(Job.created_at < anchor.created_at,
                                (Job.created_at == anchor.created_at) & (Job.id < anchor.id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def add_event(session: Session, job_id: str, message: str, *, level: str = "info",
              event_type: str = "message", data: dict[str, Any] | None = None) -> JobEvent:
    event = JobEvent(id=ids.event_id(), job_id=job_id, seq=time.time_ns(), created_at=now(), level=level,
                     type=event_type, message=message, data=data)
    session.add(event)
    return event


def list_events(session: Session, job_id: str, after: str | None, limit: int) -> tuple[list[JobEvent], bool]:
    """Newest first, as OpenAI lists them; ``after`` is an event id."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after:
        anchor = session.get(JobEvent, after)
        if anchor is None or anchor.job_id != job_id:
            raise NotFound(f"no such event: {after}", param="after")
        query = query.where(JobEvent.seq < anchor.seq)
    rows = list(session.scalars(query.order_by(JobEvent.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def set_status(session: Session, job: Job, status: str, *, stage: str | None = None,
               error: dict[str, Any] | None = None, message: str | None = None) -> None:
    """Move a job to ``status``; terminal jobs never move again."""
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job {job.id} is already {job.status}")
    job.status = status
    if stage is not None:
        job.stage = stage
    if error is not None:
        job.error = error
    if status in TERMINAL_STATUSES:
        job.finished_at = now()
        job.stage = "done"
    level = "error" if status == "failed" else "info"
    add_event(session, job.id, message or f"Job {status.replace('_', ' ')}", level=level)


def request_cancel(session: Session, tenant_id: str, job_id: str) -> Job:
    """Cancel a job: at once if no worker holds it, else cooperatively at the worker's next step."""
    job = get_job(session, tenant_id, job_id, for_update=True)
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job {job_id} is already {job.status} and cannot be cancelled", param="fine_tuning_job_id")
    job.cancel_requested = True
    if not lease_alive(session, job):
        set_status(session, job, "cancelled", message="Job cancelled")
    else:
        add_event(session, job.id, "Cancellation requested")
    return job


def add_checkpoint(session: Session, job_id: str, step: int, object_prefix: str,
                   metrics: dict[str, Any]) -> Checkpoint:
    existing = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                        Checkpoint.step_number == step)).first()
    if existing is not None:
        existing.metrics = metrics
        existing.object_prefix = object_prefix
        return existing
    checkpoint = Checkpoint(id=ids.checkpoint_id(), job_id=job_id, step_number=step,
                            object_prefix=object_prefix, metrics=metrics)
    session.add(checkpoint)
    return checkpoint


def list_checkpoints(session: Session, job_id: str, after: str | None, limit: int) -> tuple[list[Checkpoint], bool]:
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if after:
        anchor = session.get(Checkpoint, after)
        if anchor is None or anchor.job_id != job_id:
            raise NotFound(f"no such checkpoint: {after}", param="after")
        query = query.where(Checkpoint.step_number < anchor.step_number)
    rows = list(session.scalars(query.order_by(Checkpoint.step_number.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_checkpoint_rows(session: Session, job_id: str, steps: list[int]) -> None:
    for row in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                        Checkpoint.step_number.in_(steps))):
        session.delete(row)


# models ---------------------------------------------------------------------

def register_model(session: Session, *, name: str, tenant_id: str, base_model: str, job_id: str,
                   artifacts: dict[str, Any]) -> Model:
    """Register a fine-tune once; a second registration for the same job updates it in place."""
    existing = session.scalars(select(Model).where(Model.job_id == job_id)).first()
    if existing is not None:
        existing.artifacts = artifacts
        return existing
    model = Model(name=name, tenant_id=tenant_id, base_model=base_model, job_id=job_id, artifacts=artifacts)
    session.add(model)
    return model


def get_model(session: Session, tenant_id: str, name: str) -> Model | None:
    row = session.get(Model, name)
    if row is None or row.tenant_id != tenant_id:
        return None
    return row


def list_models(session: Session, tenant_id: str) -> list[Model]:
    return list(session.scalars(select(Model).where(Model.tenant_id == tenant_id).order_by(Model.created_at)))


def count_models_for_job(session: Session, job_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Model).where(Model.job_id == job_id)) or 0


# routes ---------------------------------------------------------------------

def put_route(session: Session, tenant_id: str, name: str, spec: dict[str, Any]) -> tuple[Route, bool]:
    """Create or replace the tenant's route ``name``; (the row, whether it is new)."""
    row = session.get(Route, (tenant_id, name), with_for_update=True)
    if row is None:
        ensure_tenant(session, tenant_id)
        row = Route(tenant_id=tenant_id, name=name, spec=spec)
        session.add(row)
        return row, True
    row.spec, row.updated_at = spec, now()
    return row, False


def get_route(session: Session, tenant_id: str, name: str) -> Route | None:
    return session.get(Route, (tenant_id, name))


def list_routes(session: Session, tenant_id: str) -> list[Route]:
    return list(session.scalars(select(Route).where(Route.tenant_id == tenant_id).order_by(Route.name)))


def delete_route(session: Session, tenant_id: str, name: str) -> bool:
    row = session.get(Route, (tenant_id, name))
    if row is None:
        return False
    session.delete(row)
    return True


# captured exchanges ---------------------------------------------------------
# A route's kept chats (afina.core.routing.RouteCapture). Every query names the tenant; a retraining job takes
# the unused ones by a claim (a conditional update), so two triggers at once never train on the same rows.

CLAIM_PREFIX = "claim-"  # ``used_in_job`` while a job is being started from the rows


def new_capture_claim() -> str:
    """A claim token that says when it was taken (``claim-<epoch seconds>-<random>``), so a stale one is found."""
    return f"{CLAIM_PREFIX}{int(time.time()):010d}-{secrets.token_hex(6)}"


def add_captured_exchange(session: Session, *, exchange_id: str, tenant_id: str, route: str, target: str,
                          model: str, messages: list[dict[str, Any]], answer: str,
                          finish_reason: str) -> CapturedExchange | None:
    """Keep one exchange (already redacted); None when that id is kept already (an observer told twice)."""
    if session.get(CapturedExchange, exchange_id) is not None:
        return None
    ensure_tenant(session, tenant_id)
    row = CapturedExchange(id=exchange_id, tenant_id=tenant_id, route=route, created_at=now(), seq=time.time_ns(),
                           target=target, model=model, messages=messages, answer=answer, finish_reason=finish_reason)
    session.add(row)
    return row


def get_captured_exchange(session: Session, tenant_id: str, exchange_id: str) -> CapturedExchange | None:
    row = session.get(CapturedExchange, exchange_id)
    if row is None or row.tenant_id != tenant_id:
        return None
    return row


def has_captured_exchanges(session: Session, tenant_id: str, route: str) -> bool:
    return session.scalars(select(CapturedExchange.id).where(CapturedExchange.tenant_id == tenant_id,
                                                             CapturedExchange.route == route).limit(1)).first() \
        is not None


def list_captured_exchanges(session: Session, tenant_id: str, route: str, after: str | None,
                            limit: int) -> tuple[list[CapturedExchange], bool]:
    """Newest first; ``after`` is the id of the last exchange of the previous page (NotFound if it is not one
    of this route's)."""
    query = select(CapturedExchange).where(CapturedExchange.tenant_id == tenant_id, CapturedExchange.route == route)
    if after:
        anchor = get_captured_exchange(session, tenant_id, after)
        if anchor is None or anchor.route != route:
            raise NotFound(f"no such captured exchange: {after}", param="after")
        query = query.where(or_(CapturedExchange.seq < anchor.seq,
                                (CapturedExchange.seq == anchor.seq) & (CapturedExchange.id < anchor.id)))
    rows = list(session.scalars(query.order_by(CapturedExchange.seq.desc(), CapturedExchange.id.desc())
                                .limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def captured_exchanges_for_dataset(session: Session, tenant_id: str, route: str, *, unused_only: bool = False,
                                   claim: str | None = None) -> list[CapturedExchange]:
    """Oldest first: every exchange of the route, those no job used yet, or those ``claim`` holds."""
    query = select(CapturedExchange).where(CapturedExchange.tenant_id == tenant_id, CapturedExchange.route == route)
    if claim is not None:
        query = query.where(CapturedExchange.used_in_job == claim)
    elif unused_only:
        query = query.where(CapturedExchange.used_in_job.is_(None))
    return list(session.scalars(query.order_by(CapturedExchange.seq, CapturedExchange.id)))


def count_unused_captures(session: Session, tenant_id: str, route: str) -> int:
    return session.scalar(select(func.count()).select_from(CapturedExchange).where(
        CapturedExchange.tenant_id == tenant_id, CapturedExchange.route == route,
        CapturedExchange.used_in_job.is_(None))) or 0


def claim_unused_captures(session: Session, tenant_id: str, route: str, claim: str, *,
                          stale_after_s: float) -> int:
    """Mark every unused exchange of the route with ``claim`` in one conditional update; how many it took.

    The update only takes rows still unused, so of two triggers at once the second takes none of the first's
    (on PostgreSQL it waits for the first's rows and skips them; SQLite runs one writer at a time). Claims
    older than ``stale_after_s`` (a gateway that died while starting a job) are released first.
    """
    stale = f"{CLAIM_PREFIX}{int(time.time() - stale_after_s):010d}"
    session.execute(update(CapturedExchange)
                    .where(CapturedExchange.tenant_id == tenant_id, CapturedExchange.route == route,
                           CapturedExchange.used_in_job.startswith(CLAIM_PREFIX, autoescape=True),
                           CapturedExchange.used_in_job < stale)
                    .values(used_in_job=None).execution_options(synchronize_session=False))
    result = session.execute(update(CapturedExchange)
                             .where(CapturedExchange.tenant_id == tenant_id, CapturedExchange.route == route,
                                    CapturedExchange.used_in_job.is_(None))
                             .values(used_in_job=claim).execution_options(synchronize_session=False))
    return result.rowcount or 0


def settle_capture_claim(session: Session, tenant_id: str, route: str, claim: str, job_id: str | None) -> int:
    """The claimed exchanges now belong to ``job_id`` (None: released, unused again); how many."""
    result = session.execute(update(CapturedExchange)
                             .where(CapturedExchange.tenant_id == tenant_id, CapturedExchange.route == route,
                                    CapturedExchange.used_in_job == claim)
                             .values(used_in_job=job_id).execution_options(synchronize_session=False))
    return result.rowcount or 0


def set_capture_feedback(session: Session, tenant_id: str, exchange_id: str, rating: str,
                         correction: str | None) -> CapturedExchange:
    """Record (or replace) the feedback on one of the tenant's exchanges; NotFound for any other id."""
    row = session.scalars(select(CapturedExchange).where(CapturedExchange.id == exchange_id,
                                                         CapturedExchange.tenant_id == tenant_id)
                          .with_for_update()).first()
    if row is None:
        raise NotFound(f"no captured exchange {exchange_id}", param="completion_id")
    row.feedback, row.correction = rating, correction
    return row


# leases ---------------------------------------------------------------------
# Every deadline is computed and compared on the database's clock (``afina.core.db.clock``), never a host's.

def acquire_lease(session: Session, job_id: str, owner: str, ttl_s: float) -> bool:
    """Take the job's lease if free or expired; True if this owner now holds it (``attempts`` counts it).

    An owner that already holds the lease keeps its count: a claim retried because the database
    dropped the connection after committing it is the same attempt, not a second one.
    """
    moment = now_sql(session)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id,
               or_(Job.lease_owner.is_(None), Job.lease_expires_at < moment, Job.lease_owner == owner))
        .values(lease_owner=owner, lease_expires_at=moment + ttl_s,
                attempts=case((Job.lease_owner == owner, Job.attempts), else_=Job.attempts + 1))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def renew_lease(session: Session, job_id: str, owner: str, ttl_s: float) -> bool:
    result = session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner)
                             .values(lease_expires_at=now_sql(session) + ttl_s)
                             .execution_options(synchronize_session=False))
    return result.rowcount == 1


def release_lease(session: Session, job_id: str, owner: str, *, uncount_attempt: bool = False) -> None:
    """Free the lease; ``uncount_attempt`` when the stage stopped for a reason of the worker's (a drain, a
    passing infrastructure fault) rather than dying, so it does not count against ``max_stage_attempts``."""
    values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
    if uncount_attempt:
        values["attempts"] = func.max(Job.attempts - 1, 0) if session.get_bind().dialect.name == "sqlite" \
            else func.greatest(Job.attempts - 1, 0)
    session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner).values(**values)
                    .execution_options(synchronize_session=False))


def lease_alive(session: Session, job: Job) -> bool:
    """Whether some worker holds ``job``'s lease now, by the database's clock."""
    return job.lease_owner is not None and (job.lease_expires_at or 0) > database_time(session)


def get_owned_job(session: Session, job_id: str, owner: str) -> Job:
    """The job row locked for update, if ``owner`` still holds its lease; ``LeaseLost`` otherwise.

    Every write a stage makes to its job goes through this, so a stalled worker whose lease
    another worker took over cannot change the job any more (a fencing check on the owner).
    """
    job = get_job(session, None, job_id, for_update=True)
    if job.lease_owner != owner:
        raise LeaseLost(job_id)
    return job


def claim_stale_jobs(session: Session) -> list[Job]:
    """Active jobs whose lease holder stopped heartbeating; each is claimed by exactly one caller."""
    moment = database_time(session)
    stale = list(session.scalars(select(Job).where(Job.status.in_(ACTIVE_STATUSES), Job.lease_owner.is_not(None),
                                                   Job.lease_expires_at < moment)))
    claimed = []
    for job in stale:
        result = session.execute(update(Job).where(Job.id == job.id, Job.lease_owner == job.lease_owner,
                                                   Job.lease_expires_at < moment)
                                 .values(lease_owner=None, lease_expires_at=None)
                                 .execution_options(synchronize_session=False))
        if result.rowcount == 1:
            claimed.append(job)
    return claimed
