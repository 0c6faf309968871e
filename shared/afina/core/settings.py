"""The one settings object of afina.

Every service reads its configuration from here and nowhere else; switching from
the embedded default (SQLite, local directory, filesystem broker, llama.cpp in
process) to real servers (PostgreSQL, S3, Redis, llama.cpp server) is a matter
of environment variables with the ``AFINA_`` prefix, never a code path of its own.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from afina.core.quality_gate import GateRules
from afina.core.queue.names import is_gpu_class_name

PLACEHOLDER_SECRETS = frozenset({"", "minioadmin", "changeme", "admin", "password", "secret", "afina"})


class UpstreamConfig(BaseModel):
    """An inference server the gateway forwards to (``AFINA_UPSTREAMS``, by name): a cloud provider or a
    vLLM with an OpenAI-compatible API, or an Ollama. Its key is read from the environment variable
    ``api_key_env`` names, when the gateway starts; a route names the upstream, never the key."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["openai", "ollama"] = "openai"
    base_url: str = Field(description="ends in /v1 for an OpenAI-compatible server; the root for an Ollama")
    api_key_env: str | None = None
    timeout_s: float = 120.0  # to the first byte of an answer (a stream then runs as long as it streams)
    max_concurrency: int = 64  # requests in flight to this upstream, per model


class Settings(BaseSettings):
    """afina's configuration, read from ``AFINA_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="AFINA_", env_file=None, extra="ignore")

    environment: Literal["local", "production"] = "local"
    home: Path = Field(default_factory=lambda: Path.home() / ".afina")

    # registry
    database_url: str | None = None

    # queue
    broker_url: str | None = None
    visibility_timeout_s: int = 7 * 24 * 3600
    lease_s: int = 60
    heartbeat_s: int = 10
    recovery_interval_s: int = 15
    # a stage whose worker died this many times (OOM-killed, SIGKILL) fails the job instead of retrying it
    max_stage_attempts: int = 3
    # transient infrastructure faults (a database blip, an S3 network error, a pool timeout) are retried
    # inside a stage this many times with exponential backoff from ``transient_backoff_s``; past that the
    # job goes back to the queue (after ``transient_requeue_delay_s``) instead of failing
    transient_retries: int = 5
    transient_backoff_s: float = 0.5
    transient_requeue_delay_s: float = 30.0
    # how often the outbox relay sends messages whose sender died or found the broker down
    outbox_relay_interval_s: float = 2.0
    # how often every worker's maintenance loop deletes expired files (afina.core.file_expiry); an expired file
    # is gone for the API at once, this only bounds how long its bytes outlive it
    file_expiry_sweep_interval_s: float = 60.0
    # an active job that no worker holds and whose last message went out this long ago (the broker lost it,
    # or its worker died before taking the lease) gets its message again; a duplicate is dropped by the lease
    orphan_requeue_s: int = 900
    # Celery task time limits: past the soft limit a stage fails with a clear message, past the hard
    # limit its process is killed; per-stage overrides in ``stage_time_limits_s`` ({"train": 86400})
    task_soft_time_limit_s: int = 2 * 24 * 3600
    task_hard_time_limit_grace_s: int = 600
    stage_time_limits_s: dict[str, int] = Field(default_factory=dict)

    # object store
    store_backend: Literal["local", "s3"] = "local"
    store_root: Path | None = None
    s3_endpoint: str = "127.0.0.1:8333"
    s3_access_key: SecretStr = SecretStr("")
    s3_secret_key: SecretStr = SecretStr("")
    s3_bucket: str = "afina"
    s3_secure: bool = False
    s3_region: str | None = None

    # inference: afina's own GGUF files run in process or in one llama.cpp server per model; with "ollama",
    # a model the exporter registered in Ollama (``ollama_url``) is served by that Ollama, the rest in process
    inference_backend: Literal["inprocess", "llamacpp-server", "ollama"] = "inprocess"
    # OpenAI-compatible or Ollama servers a route may name as a target's ``upstream`` (cloud first, local after)
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    # how long a model stays loaded after its last call (Ollama's keep_alive; a request may say otherwise;
    # negative: until evicted)
    keep_alive_s: float = 300.0
    # per model: requests generating at once on an Ollama (a local llama.cpp model runs one at a time; an
    # upstream has its own ``max_concurrency``), requests waiting beyond those (past it: 429 with Retry-After),
    # and how long one may wait for its turn (past it: 503 with Retry-After); never an unbounded pile-up
    model_max_concurrency: int = 4
    model_max_queue: int = 64
    model_queue_timeout_s: float = 60.0
    # a newcomer who would wait longer than this (the model's recent call time x the calls ahead) gets 429 at
    # once, with that wait as Retry-After, instead of a first token a minute late
    model_max_queue_wait_s: float = 15.0
    # an upstream that just failed (down, timed out, 5xx, 429) is skipped this long while a route's fallback
    # remains, so that the fallback answers at once instead of after the same timeout; 0: always try it
    upstream_cooldown_s: float = 10.0
    # per API key, per minute, for a key that sets none of its own (None: no limit); counted in Redis
    # (``rate_limit_redis_url``, by default the broker when it is Redis) so that every gateway process shares them
    key_requests_per_minute: int | None = None
    key_tokens_per_minute: int | None = None
    rate_limit_redis_url: str | None = None
    # capture for retraining: a route's automatic retraining that failed waits this long before it is tried
    # again; exchanges a gateway claimed for a job and never settled (it died) are free again after this long
    capture_retrain_retry_s: float = 300.0
    capture_stale_claim_s: float = 3600.0
    llamacpp_server_base_port: int = 18400
    inference_n_ctx: int = 2048
    inference_threads: int | None = None
    max_loaded_models: int = 2

    # workers
    work_dir: Path | None = None
    model_cache_dir: Path | None = None
    trainer_device: Literal["auto", "cpu", "cuda"] = "auto"
    # GPU classes (node pools, groups of hosts): class name -> GiB of memory of one of its GPUs, e.g.
    # {"l4": 24, "a100-80gb": 80}. A job that names a class, or that its preflight finds too big for the
    # GPU it landed on, goes to the queue "train.<class>" (afina.core.gpu_classes)
    gpu_classes: dict[str, float] = Field(default_factory=dict)
    # this trainer worker's class (None: the default class, which serves the plain "train" queue)
    gpu_class: str | None = None
    # the class whose trainers also serve the plain "train" queue (the jobs that name no class)
    default_gpu_class: str | None = None
    # GPUs one trainer worker owns (the local runner starts one worker per group of this many visible GPUs);
    # a job may ask for up to this many (num_gpus), data parallel
    gpus_per_worker: int = Field(1, ge=1, le=8)
    # a worker process imports its heavy libraries (torch, transformers, TRL, Unsloth on CUDA) when it
    # starts, not when its first job arrives; compiled kernels are cached under <home>/cache (a volume)
    worker_preload: bool = True
    checkpoint_keep_last: int = 3
    # the GGUF variants a job gets when it does not choose (None: by model size, see
    # afina.core.artifacts.export_options.default_variants)
    export_quantizations: list[str] | None = None
    # the fidelity gate: greedy tokens of the f16 GGUF against the merged model on held-out prompts. A prompt
    # agrees when its first ``fidelity_tokens`` greedy tokens are the merged model's, or first differ at a near
    # tie of the merged model (the f16 GGUF took its runner-up, which its top token led by at most
    # ``fidelity_near_tie_margin`` logits). The export fails when the share of agreeing prompts is below
    # ``fidelity_min_agreement`` AND at least 2 prompts disagree (afina.exporter.fidelity.MIN_DISAGREEMENTS): on
    # the 2 held-out prompts of a tiny job, or the default 16, one stray divergence alone would break 95%; it is
    # reported as a warning instead. The same rule holds for each quantized variant against f16.
    fidelity_prompts: int = 16  # the first N of the test split (else validation)
    fidelity_tokens: int = 32  # greedy tokens compared per prompt
    fidelity_min_agreement: float = 0.95  # share of prompts that must agree (exact or near tie)
    # each quantized variant: greedy-token agreement with f16 (reported; refused below this) and perplexity on
    # the validation texts at most this many times f16's
    fidelity_min_variant_agreement: float = 0.0
    fidelity_max_perplexity_ratio: float = 1.5
    # near ties, in logits of the compared-with side (the merged model for f16, f16 for a quantized variant):
    # f16 weights move the top-2 gap of SmolLM2-135M's float32 logits by up to 0.05 (0.027 at the 99th
    # percentile, 800 positions), so a first difference within 0.1 is rounding, not another model (which
    # diverges where it led by whole logits); every such prompt is reported
    fidelity_near_tie_margin: float = 0.1

    # evaluation (a job of its own after every export, on the ``evaluate`` queue): the base model, the
    # fine-tuned model and every GGUF variant on the held-out split (test, else validation)
    evaluation_enabled: bool = True
    evaluation_max_examples: int = Field(200, ge=1)  # the first N held-out examples
    evaluation_max_new_tokens: int = Field(64, ge=1)  # greedy tokens generated per answer
    evaluation_train_examples: int = Field(32, ge=0)  # training examples scored for the train/held-out loss gap
    evaluation_overfit_gap: float = 0.5  # held-out loss minus train loss (nats) above which overfitting is flagged
    evaluation_max_labels: int = Field(20, ge=2)  # a split with more distinct short answers is not a label task
    # the quality gate's rules (JSON, afina.core.quality_gate.GateRules); ``enforce`` blocks serving on failure
    quality_gate: GateRules = Field(default_factory=GateRules)
    # the LLM judge (afina.evaluator.judge): a model afina's own gateway serves grades each answer against its
    # reference with a rubric, through the gateway's /v1/chat/completions; None: no judge. The key is a gateway
    # API key (a SecretStr: never logged or shown); the URL defaults to ``public_base_url`` + /v1
    evaluation_judge_model: str | None = None
    evaluation_judge_base_url: str | None = None
    evaluation_judge_api_key: SecretStr | None = None
    evaluation_judge_automatic: bool = False  # also judge every automatic (post-export) evaluation
    evaluation_judge_max_tokens: int = Field(160, ge=16)  # the verdict's tokens (a score and a short reason)
    evaluation_judge_retries: int = Field(2, ge=0)  # more tries of a call that failed transiently (5xx, 429, network)
    evaluation_judge_timeout_s: float = Field(120.0, gt=0)

    # publishing: an Ollama the exporter registers models in (None: no registration unless a job asks and
    # fails saying none is configured); a tenant's models are named "<prefix><name>", the prefix a template
    ollama_url: str | None = None
    ollama_name_prefix: str = "{tenant}-"
    ollama_timeout_s: float = 600.0
    # the Hugging Face Hub: its endpoint, and which environment variables a tenant's hub.token_env may name
    # ("*": every tenant); HF_TOKEN is the default a job gets when it names none
    hub_endpoint: str = "https://huggingface.co"
    hub_token_envs: dict[str, list[str]] = Field(default_factory=lambda: {"*": ["HF_TOKEN"]})

    # gateway
    max_upload_bytes: int = 512 * 1024 * 1024
    # a JSON request body past this answers 413 before it is parsed; a multipart form may carry at most
    # ``max_form_fields`` non-file fields of ``max_form_field_bytes`` each
    max_json_body_bytes: int = 8 * 1024 * 1024
    max_form_fields: int = 32
    max_form_field_bytes: int = 64 * 1024
    # /docs, /redoc and /openapi.json: None means on in local mode and off in production
    expose_docs: bool | None = None
    # FastAPI's native OpenTelemetry (a span and metrics per request, sent to the global providers an operator
    # configures, e.g. through ``opentelemetry-instrument``): off by default, as afina's own metrics are
    # Prometheus; off, no request pays for asking whether a provider is configured
    gateway_opentelemetry: bool = False
    # leftover upload spools and ingest temporary folders older than this are removed at start and
    # by the workers' maintenance sweep (a crash never cleans its own)
    stale_temp_after_s: int = 6 * 3600

    # base models from the worker's filesystem: off unless the operator lists the directories that
    # may be named (a job's ``model`` or ingest's ``base_model`` as a path, ``file://`` or ``~``)
    allowed_model_dirs: list[Path] = Field(default_factory=list)
    # which environment variables ``encryption.key_env`` may name, per tenant (``"*"``: every tenant),
    # e.g. {"acme": ["ACME_FERNET_KEY"], "*": ["AFINA_SHARED_FERNET_KEY"]}
    encryption_key_envs: dict[str, list[str]] = Field(default_factory=dict)

    # ingest: the Fernet key that encrypts normalized splits at rest (options ``encrypt_at_rest``);
    # a SecretStr, so it never appears in a repr, a log line or an error
    data_encryption_key: SecretStr | None = None
    ingest_progress_every: int = 10_000  # rows between progress events
    ingest_processes: int = 2  # worker processes for the per-example work of large files (0: in process)
    max_archive_expanded_bytes: int = 4 * 1024 * 1024 * 1024  # a ZIP/tar expanding past this is a bomb
    public_base_url: str = "http://127.0.0.1:8000"
    events_poll_s: float = 1.0  # how often a job's event stream (SSE) looks for new events
    events_keepalive_s: float = 15.0  # an SSE comment line after this long without an event

    # metrics (workers expose them on their own port; 0 disables)
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"

    # logging
    log_level: str = "INFO"
    log_json: bool = True

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.environment == "production" and self.store_backend == "s3":
            for name in ("s3_access_key", "s3_secret_key"):
                if getattr(self, name).get_secret_value() in PLACEHOLDER_SECRETS:
                    raise ValueError(f"AFINA_{name.upper()} is a placeholder; set a real secret in production")
        return self

    @field_validator("gpu_class", "default_gpu_class", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value  # compose passes an unset class as an empty variable

    @model_validator(mode="after")
    def _known_gpu_classes(self) -> Settings:
        for name, gib in self.gpu_classes.items():
            if not is_gpu_class_name(name) or gib <= 0:
                raise ValueError(f"AFINA_GPU_CLASSES: {name!r}: {gib} is not a class name (lower-case letters, "
                                 f"digits and '-', not 'x<N>') with a positive memory in GiB")
        for setting in ("gpu_class", "default_gpu_class"):
            value = getattr(self, setting)
            if value is not None and value not in self.gpu_classes:
                raise ValueError(f"AFINA_{setting.upper()}={value!r} is not one of the classes AFINA_GPU_CLASSES "
                                 f"declares ({sorted(self.gpu_classes) or 'none'})")
        return self

    @property
    def docs_enabled(self) -> bool:
        return self.environment == "local" if self.expose_docs is None else self.expose_docs

    def stage_time_limits(self, stage: str) -> tuple[int, int]:
        """(soft, hard) seconds for a stage's Celery task."""
        soft = self.stage_time_limits_s.get(stage, self.task_soft_time_limit_s)
        return soft, soft + self.task_hard_time_limit_grace_s

    def key_envs_for(self, tenant_id: str) -> frozenset[str]:
        """The environment variables ``tenant_id``'s ingest options may name as an encryption key."""
        return frozenset(self.encryption_key_envs.get(tenant_id, [])) | frozenset(self.encryption_key_envs.get("*", []))

    def hub_token_envs_for(self, tenant_id: str) -> frozenset[str]:
        """The environment variables ``tenant_id``'s ``export.hub.token_env`` may name."""
        return frozenset(self.hub_token_envs.get(tenant_id, [])) | frozenset(self.hub_token_envs.get("*", []))

    def ollama_prefix_for(self, tenant_id: str) -> str:
        return self.ollama_name_prefix.format(tenant=tenant_id.lower())

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'afina.db'}"

    @cached_property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.home / "broker"

    @property
    def resolved_rate_limit_redis_url(self) -> str | None:
        """Where per-key counters live: the setting, else the broker when it is Redis, else in process (None)."""
        if self.rate_limit_redis_url:
            return self.rate_limit_redis_url
        broker = self.resolved_broker_url
        return broker if broker.startswith(("redis://", "rediss://")) else None

    @property
    def resolved_store_root(self) -> Path:
        return self.store_root or self.home / "store"

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.home / "work"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir or self.home / "models"


def get_settings() -> Settings:
    """Read the settings from the environment now (callers keep the object they get)."""
    return Settings()
