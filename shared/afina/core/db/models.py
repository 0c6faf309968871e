"""The job and model registry: tenants, API keys, files, jobs, events, checkpoints, models.

Every row that belongs to a user carries ``tenant_id``; queries filter on it so
another tenant's object is indistinguishable from a missing one.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ApiKey(Base):
    """An API key, stored as its sha256; ``prefix`` lets a person recognise it in listings."""

    __tablename__ = "api_keys"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    # epoch seconds; a key past ``expires_at`` authenticates no more (None: never expires)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # afina.core.keys: the scopes it grants (None: every scope, as keys made before scopes) and its limits
    scopes: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)


class File(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(1024))
    status: Mapped[str] = mapped_column(String(32), default="processed")
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    # ingest (purpose fine-tune): the options sent with the upload, OpenAI's status_details on error,
    # the dataset version it produced, and progress/counts/issue summary while and after it runs
    ingest_options: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    dataset_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    ingest_state: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # OpenAI's ``expires_at`` (epoch seconds on the database's clock; None: kept until deleted). Past it the
    # file is gone for the API at once; the sweeper (afina.core.file_expiry) deletes its row and bytes
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)


class Job(Base):
    """A fine-tuning job. ``status`` is OpenAI's; ``stage`` is which worker owns it next."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    model: Mapped[str] = mapped_column(String(256))  # the base model's id (OpenAI's ``model``)
    # afina.core.catalog.ResolvedBaseModel, resolved once at creation (None: a job from before 0004)
    base_model: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    # what the user asked for (TrainingSpec.requested()), the one copy; the API shows it with the resolved values
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # afina.core.training.TrainingConfig once the train stage sized the run: every number it trained with
    training_config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # {"type": "supervised", "supervised": {"init_from": {...}}}: no hyperparameters (those are above);
    # a re-export job: {"type": "export", "export": {"model": <name>, "source_job_id": <job>}}
    method: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # "fine_tune" (listed by /v1/fine_tuning/jobs) or "export" (POST /v1/models/{model}/exports)
    kind: Mapped[str] = mapped_column(String(16), default="fine_tune", server_default="fine_tune", index=True)
    # afina.core.artifacts.ExportOptions the job asked for (None: the defaults)
    export_options: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(32), default="validating_files", index=True)
    stage: Mapped[str] = mapped_column(String(16), default="ingest")
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    dataset_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now, index=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # where the train stage runs (afina.core.gpu_classes.train_queue): the class asked for or chosen by the
    # preflight (None: the default class), and how many GPUs train the job together
    gpu_class: Mapped[str | None] = mapped_column(String(32), nullable=True)
    num_gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger, autoincrement=False)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    object_prefix: Mapped[str] = mapped_column(String(1024))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Model(Base):
    """A servable model: a fine-tune's GGUF files, keyed by its public name."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(512), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    job_id: Mapped[str] = mapped_column(String(40), unique=True)
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    # afina.core.artifacts.publish records: where the model was published outside afina, and how that went
    ollama: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    hub: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # afina.core.artifacts.evaluation.QualityGate: the evaluation's verdict (None until the model is evaluated)
    quality_gate: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Route(Base):
    """A public name the gateway resolves to models (``afina.core.routing.RouteSpec``), per tenant."""

    __tablename__ = "routes"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # RouteSpec.to_row()
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now)


class RegistryGeneration(Base):
    """One row whose ``value`` every write to api_keys, models or routes moves (triggers, migration 0009), so a
    gateway holding those rows in memory knows from one cheap read whether they are still current."""

    __tablename__ = "registry_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class CapturedExchange(Base):
    """One answered chat of a route with capture on (``afina.core.routing.RouteCapture``), already redacted.

    ``id`` is the exchange's (an OpenAI chat completion is ``chatcmpl-<id>``); ``messages`` are the request's
    (the route's system prompt included); ``correction`` replaces ``answer`` in training data. ``used_in_job``
    is the fine-tuning job that took the exchange (while a job is being started: its ``claim-…`` token).
    """

    __tablename__ = "captured_exchanges"
    __table_args__ = (Index("ix_captured_exchanges_route", "tenant_id", "route", "used_in_job"),
                      Index("ix_captured_exchanges_seq", "tenant_id", "route", "seq"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    route: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    seq: Mapped[int] = mapped_column(BigInteger, autoincrement=False)  # nanoseconds: the order they were kept in
    target: Mapped[str] = mapped_column(String(600))  # the route target's label (``upstream/model`` or a model)
    model: Mapped[str] = mapped_column(String(600))  # what the backend served
    messages: Mapped[list[Any]] = mapped_column(JSON)
    answer: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    feedback: Mapped[str | None] = mapped_column(String(8), nullable=True)  # "up" or "down"
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    used_in_job: Mapped[str | None] = mapped_column(String(40), nullable=True)


class OutboxMessage(Base):
    """A queue message written in the same transaction as the state change that calls for it.

    The sender tries to deliver it right after the commit; a relay in every worker delivers what
    a crashed sender or an unreachable broker left behind. Delivery is at least once: stages drop
    a duplicate through the job's lease and stage.
    """

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "sent_at", "available_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(String(128))
    queue: Mapped[str] = mapped_column(String(64))
    subject_id: Mapped[str] = mapped_column(String(40), index=True)  # the job or file the message moves
    created_at: Mapped[float] = mapped_column(Float)
    available_at: Mapped[float] = mapped_column(Float)  # not sent before (a requeue after a transient fault)
    claimed_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    send_attempts: Mapped[int] = mapped_column(Integer, default=0)
