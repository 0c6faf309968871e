"""The LoRA supervised fine-tuning recipe: the whole train stage of a job, top to bottom.

``train_job`` is the stage function ``run_stage`` calls. The recipe follows the
torchtune protocol: ``setup`` (each ``_setup_*`` takes what it needs as arguments and
returns one object), ``train``, ``save_checkpoint`` / ``load_checkpoint``,
``save_adapter``, ``cleanup``.

What the job asked for is read once (``lifecycle.resolution_input``: an earlier attempt's
``training_config``, else the request); the fields needed before the run can be sized
(``max_seq_len``, ``packing``, ``assistant_only_loss``, ``backend``) come from that same
``TrainingSpec``, and the resolved ``TrainingConfig`` is stored once in
``job.training_config``. The base model is the one resolved when the job was created
(``lifecycle.job_base_model``).

A run can die anywhere (a SIGKILLed worker, a lost lease): every checkpoint is
in the store before its database row exists, and a new attempt starts by
downloading the newest one and resuming optimizer, scheduler, RNG and step from
it. The adapter is committed by writing its ``AdapterManifest`` last; a stage that
finds it skips straight to export.

Backends (``backends/``): ``hf`` (transformers + PEFT, any device) or ``unsloth`` (CUDA), chosen by
``hyperparameters.backend``; only the model loading differs, both train through TRL's ``SFTTrainer``
with the same rows, callbacks and checkpoints.

``num_gpus`` > 1: the worker starts this same recipe in N processes under torchrun (``distributed.py``);
each is one rank (``RankInfo``), rank 0 writes everything, the others only train.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afina.core.artifacts.adapter import ADAPTER_MARKER, AdapterManifest, commit_adapter
from afina.core.artifacts.dataset import DatasetManifest
from afina.core.catalog import BaseModelSpec, ChatFamily
from afina.core.datasets.layout import adapter_prefix, job_prefix
from afina.core.db import repository as repo
from afina.core.errors import InsufficientMemory, TrainingFailed
from afina.core.gpu_classes import reroute_or_raise
from afina.core.logging import log_event
from afina.core.queue.jobs import JobContext
from afina.core.training import TrainingConfig, check_max_seq_len, parse_training_spec, resolve_hyperparameters
from afina.core.training.lifecycle import job_base_model, resolution_input, stored_training_config
from afina.trainer import checkpoints
from afina.trainer.adapter import point_adapter_at
from afina.trainer.backends import BackendName, ModelRequest, load_trainable_model, prepare_backend
from afina.trainer.data import (
    EncodedSplit,
    PreparedDataset,
    check_template_parity,
    encode_split,
    encode_training_split,
    load_prepared_dataset,
)
from afina.trainer.distributed import (
    RankInfo,
    RankSync,
    check_gpu_count,
    data_parallel_backend,
    split_batch,
    train_data_parallel,
)
from afina.trainer.guards import LossGuard, is_out_of_memory, loss_guard_callback
from afina.trainer.kernels import FusedKernels, use_fused_kernels
from afina.trainer.packing import PaddingFreeCollator, pack_rows
from afina.trainer.parent import check_compatible, fetch_parent_adapter, load_parent_weights, parent_job_of
from afina.trainer.phases import PhaseClock
from afina.trainer.preflight import (
    GIB,
    MemoryEstimate,
    ModelShape,
    Resources,
    RunShape,
    check_fits,
    checkpoint_bytes,
    cuda_free_bytes,
    halve_micro_batch,
)
from afina.trainer.report import RunFacts, build_report, metric_records, metrics_jsonl
from afina.trainer.throughput import Checkpointing, Fixed, ThroughputPlan, plan_throughput
from afina.trainer.warmup import settle_heap

if TYPE_CHECKING:  # callbacks imports transformers: the recipe imports it only inside a running stage
    from afina.trainer.callbacks import RunObservers

log = logging.getLogger("afina.trainer")

NEXT_STAGE = "export"
# where ``speed: auto`` plans the run: a GPU's memory is what limits its speed; a CPU run keeps its config
PLANNED_DEVICES: tuple[str, ...] = ("cuda",)
Rows = list[dict[str, list[int]]]


@dataclass(frozen=True)
class EncodedDataset:
    """The job's dataset, tokenized and labelled, with the manifest it came from."""

    manifest: DatasetManifest
    train: EncodedSplit
    validation: EncodedSplit


@dataclass(frozen=True)
class Placement:
    """Where and how the run trains: the device, the backend that loads the model, the weights' dtype."""

    device: str  # "cpu" | "cuda"
    backend: BackendName
    dtype: str  # "float32" | "bfloat16" | "float16"


def train_job(context: JobContext) -> str:
    """Run the train stage of ``context.job_id``; returns the next stage (``export``)."""
    recipe = LoRAFinetuneRecipe(context)
    if recipe.adapter_committed():
        context.event("Adapter already trained by an earlier attempt; moving on to export")
        return NEXT_STAGE
    num_gpus = parse_training_spec(resolution_input(recipe.job)).num_gpus
    if num_gpus > 1:
        recipe.launch_data_parallel(num_gpus)  # the ranks run ``run_recipe``; this process keeps the lease
    else:
        _run(recipe)
    return NEXT_STAGE


def run_recipe(context: JobContext, *, rank: RankInfo, sync: RankSync | None) -> None:
    """The whole run in one rank of a data-parallel job (``afina.trainer.rank``): rank 0 also saves."""
    _run(LoRAFinetuneRecipe(context, rank=rank, sync=sync))


def _run(recipe: LoRAFinetuneRecipe) -> None:
    try:
        recipe.setup()
        recipe.train()
        if recipe.rank.is_main:
            recipe.save_adapter()
            recipe.save_report()
    finally:
        recipe.cleanup()


class LoRAFinetuneRecipe:
    """One LoRA SFT run of one job."""

    def __init__(self, context: JobContext, *, rank: RankInfo | None = None, sync: RankSync | None = None) -> None:
        self.context = context
        self.runtime = context.runtime
        self.settings = context.runtime.settings
        self.job = context.snapshot()
        self.rank = rank or RankInfo()
        self.sync = sync  # the collectives of a data-parallel run; None in a single process
        self.work_dir = self.settings.resolved_work_dir / context.job_id
        if self.rank.distributed:  # the ranks share the host: each its own folder beside the others
            self.work_dir = self.work_dir / f"rank-{self.rank.rank}"
        self.output_dir = self.work_dir / "output"
        self.started = time.monotonic()
        self.phases = PhaseClock()
        self.plan: ThroughputPlan | None = None
        self.kernels = FusedKernels(False, "not decided yet")
        self.measured_peak: float | None = None  # bytes of GPU memory at the plan's check step
        self.resumed_from: int | None = None
        self.observers: RunObservers | None = None  # once setup reaches the trainer
        self._published_config = self.job.training_config

    def launch_data_parallel(self, num_gpus: int) -> None:
        """Check ``num_gpus`` against this worker, then run the job's ranks and supervise them
        (``distributed.train_data_parallel``): refused early when the worker cannot, never late in a rank."""
        wanted = parse_training_spec(resolution_input(self.job))
        device = self._setup_device(self.settings.trainer_device)
        check_gpu_count(num_gpus, device, _visible_cuda_devices(device))
        _backend, note = data_parallel_backend(wanted.backend, device, num_gpus)
        if note is not None:
            self.context.event(note, level="warn")
        train_data_parallel(self.context, num_gpus=num_gpus, device=device, work_dir=self.work_dir,
                            adapter_committed=self.adapter_committed)

    def adapter_committed(self) -> bool:
        """An earlier attempt committed the adapter (its manifest, written last, is in the store)."""
        prefix = adapter_prefix(self.context.tenant_id, self.context.job_id)
        return AdapterManifest.read(self.runtime.store, f"{prefix}/{ADAPTER_MARKER}") is not None

    # setup -----------------------------------------------------------------

    def setup(self) -> None:
        context = self.context
        context.set_status("running", message="Fine-tuning job started")
        shutil.rmtree(self.work_dir, ignore_errors=True)  # a dead attempt's files; the store has what counts
        self.output_dir.mkdir(parents=True)
        self.base = job_base_model(self.job, store=self.runtime.store,
                                   allowed_model_dirs=self.settings.allowed_model_dirs)
        requested = resolution_input(self.job)
        wanted = parse_training_spec(requested)  # what the config resolves from, before the data sizes it
        prepared = self._setup_prepared_dataset(self.job.dataset_key)  # before the model: a bad one fails in a second
        device = self._setup_device(self.settings.trainer_device)
        # before the tokenizer: Unsloth precedes transformers
        backend = self._setup_backend(wanted.backend, device, self.rank.world_size)
        self.placement = Placement(device=device, backend=backend, dtype=_dtype_name(device))
        self.phases.mark("backend import")
        self.base_model_dir = self._setup_base_model(self.base)
        self.tokenizer = self._setup_tokenizer(self.base_model_dir, self.base)
        self.phases.mark("base model files")
        context.check_continue()
        max_seq_len = check_max_seq_len(wanted.max_seq_len, self.base.context_length)
        self.dataset = self._setup_data(prepared, self.tokenizer, self.base.family.training_template,
                                        max_seq_len, assistant_only=wanted.assistant_only_loss)
        self.train_rows = self._setup_train_rows(self.dataset.train.rows, max_seq_len, packing=wanted.packing)
        # with packing, a "training example" of the batch rules is a packed row
        self.config = self._setup_config(requested, n_train=len(self.train_rows),
                                         n_validation=len(self.dataset.validation.rows), base=self.base)
        if self.rank.distributed:
            split = split_batch(self.config.batch_size, self.config.gradient_accumulation_steps,
                                self.rank.world_size)
            self.context.event(f"Data parallel over {self.rank.world_size} processes: {split.describe()}",
                               level="info" if split.kept else "warn")
        self.phases.mark("dataset")
        self.kernels = self._setup_kernels(self.config, self.placement, self.base_model_dir)
        try:
            self.plan = self._setup_plan(self.config, self.placement, self.base_model_dir, self.train_rows,
                                         self.base.family)
            if self.plan is not None:
                self.config = self._apply_plan(self.config, self.plan)
            self.memory_estimate = self._setup_preflight(self.config, self.placement, self.base_model_dir,
                                                         self.train_rows, self.base.family)
        except InsufficientMemory as failure:
            # a larger GPU class may hold what this GPU cannot: the job moves there instead of failing
            reroute_or_raise(self.settings, failure, device=self.placement.device, asked_class=self.config.gpu_class,
                             this_gpu_bytes=cuda_free_bytes()[1] if self.placement.device == "cuda" else None)
            raise
        context.check_continue()
        self.model = self._setup_model(self.config, self.placement, self.base_model_dir, self.base,
                                       pad_token_id=self.tokenizer.pad_token_id)
        self.phases.mark("model load")
        self.observers = self._setup_observers(self.work_dir / "metrics")
        self.resume_dir = self.load_checkpoint()
        self.trainer = self._setup_trainer(self.config, self.placement, self.model, self.tokenizer, self.train_rows,
                                           self.dataset.validation.rows, self.observers)
        self.phases.mark("trainer setup")

    @staticmethod
    def _setup_device(wanted: str) -> str:
        """``AFINA_TRAINER_DEVICE`` (auto, cpu, cuda) checked against what this worker has."""
        import torch

        if wanted == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if wanted == "cuda" and not torch.cuda.is_available():
            raise TrainingFailed("AFINA_TRAINER_DEVICE=cuda but this worker sees no CUDA device; "
                                 "set AFINA_TRAINER_DEVICE=auto or cpu, or run the job on a GPU worker")
        return wanted

    @staticmethod
    def _setup_backend(requested: str, device: str, world_size: int = 1) -> BackendName:
        """The backend that trains; with several ranks ``hf`` (the worker said so in an event before launching)."""
        backend, _note = data_parallel_backend(requested, device, world_size)
        prepare_backend(backend)
        return backend

    def _setup_prepared_dataset(self, dataset_key: str | None) -> PreparedDataset:
        return load_prepared_dataset(self.runtime.store, dataset_key, self.settings.data_encryption_key)

    def _setup_base_model(self, base: BaseModelSpec) -> Path:
        from afina.core.hfmodels import materialize_base_model

        self.context.event(f"Preparing base model {base.id}")
        return materialize_base_model(base, self.settings.resolved_model_cache_dir, store=self.runtime.store)

    @staticmethod
    def _setup_tokenizer(base_model_dir: Path, base: BaseModelSpec) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
        # the tokenizer keeps the STOCK template: that is what the adapter ships with and the export serves
        tokenizer.chat_template = base.family.stock_template
        if tokenizer.eos_token != base.family.eos_token:
            raise TrainingFailed(f"{base.id}: tokenizer EOS is {tokenizer.eos_token!r}, the catalog says "
                                 f"{base.family.eos_token!r}")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            # pad == EOS would mask EOS out of the loss and the model would never learn to stop
            raise TrainingFailed(f"{base.id}: pad token must differ from EOS; rebuild the model cache")
        return tokenizer

    def _setup_data(self, prepared: PreparedDataset, tokenizer: Any, training_template: str, max_seq_len: int, *,
                    assistant_only: bool) -> EncodedDataset:
        """Both splits tokenized and labelled with ``training_template`` (checked to render like the stock one)."""
        check_template_parity(tokenizer, prepared.train, training_template)
        train = encode_training_split(tokenizer, prepared.train, training_template, max_seq_len,
                                      assistant_only=assistant_only)
        validation = encode_split(tokenizer, prepared.validation, training_template, max_seq_len,
                                  assistant_only=assistant_only)
        dropped = f"; {train.dropped} dropped with nothing to train on" if train.dropped else ""
        self.context.event(f"Dataset tokenized: {len(train.rows)} training example(s), {train.tokens:,} tokens "
                           f"({train.trained_tokens:,} trained), {len(validation.rows)} validation example(s)"
                           f"{dropped}; {train.truncated} truncated to {max_seq_len} tokens")
        if prepared.validation and not validation.rows:
            self.context.event("No validation example has an assistant token within max_seq_len; "
                               "validation loss will not be reported", level="warn")
        return EncodedDataset(manifest=prepared.manifest, train=train, validation=validation)

    def _setup_train_rows(self, rows: Rows, max_seq_len: int, *, packing: bool) -> Rows:
        """The rows the trainer iterates: the encoded examples, or bins of them when ``packing`` is on."""
        if not packing:
            return rows
        packed, summary = pack_rows(rows, max_seq_len)
        self.context.event(f"Packed {summary.examples} example(s) into {summary.rows} row(s) of up to "
                           f"{max_seq_len} tokens ({summary.fill:.0%} filled)")
        return packed

    def _setup_config(self, requested: dict[str, Any], *, n_train: int, n_validation: int,
                      base: BaseModelSpec) -> TrainingConfig:
        """Resolve ``requested`` for ``n_train`` rows and store the result once in ``job.training_config``."""
        config = resolve_hyperparameters(requested, n_train, base.context_length, n_validation=n_validation,
                                         default_target_modules=base.family.target_modules)
        stored = stored_training_config(config)
        if stored != self._published_config:
            self.context.record_training_config(stored)
            self._published_config = stored
        self.context.event("Hyperparameters: " + ", ".join(f"{k}={v}" for k, v in stored.items() if v is not None))
        return config

    def _setup_preflight(self, config: TrainingConfig, placement: Placement, base_model_dir: Path, train_rows: Rows,
                         family: ChatFamily) -> MemoryEstimate:
        """Refuse, with a setting that would fit, a run this worker cannot hold (before loading the model)."""
        model_shape = ModelShape.from_config_file(base_model_dir / "config.json")
        run_shape = self._run_shape(config, placement, train_rows, family)
        resources = Resources.measure(placement.device, self.work_dir)
        disk_needed = checkpoint_bytes(model_shape, run_shape) * 2
        estimate = check_fits(model_shape, run_shape, resources, disk_needed=disk_needed)
        where = "GPU memory" if placement.device == "cuda" else "RAM"
        self.context.event(f"Preflight: about {estimate.total / GIB:.1f} GiB of {where} needed "
                           f"({estimate.describe()})")
        return estimate

    def _run_shape(self, config: TrainingConfig, placement: Placement, train_rows: Rows,
                   family: ChatFamily) -> RunShape:
        """What the memory estimate needs of ``config`` on ``placement`` (the longest row sizes the worst batch)."""
        longest = config.max_seq_len if config.packing else max(len(row["input_ids"]) for row in train_rows)
        return RunShape(backend=placement.backend, device=placement.device, dtype=placement.dtype,
                        quantization=config.quantization, batch_size=config.batch_size,
                        gradient_accumulation_steps=config.gradient_accumulation_steps, tokens_per_row=longest,
                        gradient_checkpointing=_gradient_checkpointing(config, placement.device),
                        lora_r=config.lora_r, target_modules=lora_targets(config, family),
                        checkpoint_layers=config.checkpoint_layers, fused_loss=self.kernels.enabled)

    def _setup_kernels(self, config: TrainingConfig, placement: Placement, base_model_dir: Path) -> FusedKernels:
        """Liger's fused kernels for the hf backend on CUDA (``speed: auto``), said in the events when used."""
        import json

        model_type = str(json.loads((base_model_dir / "config.json").read_text()).get("model_type", ""))
        kernels = use_fused_kernels(speed=config.speed, device=placement.device, backend=placement.backend,
                                    model_type=model_type)
        if kernels.enabled:
            self.context.event(f"Fused kernels: {kernels.reason}")
        return kernels

    def _setup_plan(self, config: TrainingConfig, placement: Placement, base_model_dir: Path, train_rows: Rows,
                    family: ChatFamily) -> ThroughputPlan | None:
        """``speed: auto`` on a GPU: the fastest micro-batch split and checkpointing that fit its free memory."""
        if config.speed != "auto" or placement.device not in PLANNED_DEVICES:
            return None
        model_shape = ModelShape.from_config_file(base_model_dir / "config.json")
        run_shape = self._run_shape(config, placement, train_rows, family)
        resources = Resources.measure(placement.device, self.work_dir)
        budget = resources.gpu_free if placement.device == "cuda" else resources.ram_available
        if self.sync is not None:  # every rank must plan the same micro-batch: the tightest GPU decides
            budget = self.sync.min_over_ranks(float(budget or 0.0))
        mean_tokens = sum(len(row["input_ids"]) for row in train_rows) / len(train_rows)
        plan = plan_throughput(model_shape, run_shape, budget=budget or 0.0,
                               fixed=self._fixed_by_request(config, placement.backend),
                               mean_tokens_per_row=mean_tokens)
        self.context.event(f"Throughput plan (speed auto): {plan.describe()}")
        for note in plan.notes:
            self.context.event(note, level="warn")
        return plan

    def _fixed_by_request(self, config: TrainingConfig, backend: str) -> Fixed:
        """What the request set explicitly (``job.hyperparameters`` holds only what was set): the plan keeps it."""
        asked = self.job.hyperparameters or {}
        checkpointing = None
        if asked.get("gradient_checkpointing", "auto") != "auto":
            checkpointing = checkpoint_mode(config, backend)
        return Fixed(accumulation=config.gradient_accumulation_steps if "gradient_accumulation_steps" in asked
                     else None,
                     checkpointing=checkpointing,
                     checkpoint_layers=config.checkpoint_layers if "checkpoint_layers" in asked else None)

    def _apply_plan(self, config: TrainingConfig, plan: ThroughputPlan) -> TrainingConfig:
        """``config`` with the plan's micro-batch, accumulation and checkpointing, stored as the job's config."""
        chosen = plan.chosen
        setting: dict[str, Any] = {"none": {"gradient_checkpointing": False, "checkpoint_layers": None},
                                   "full": {"gradient_checkpointing": True, "checkpoint_layers": None},
                                   # true is Unsloth's offloaded variant on its backend, and still means
                                   # something to a CPU worker that resumes the job
                                   "offloaded": {"gradient_checkpointing": True, "checkpoint_layers": None},
                                   "selective": {"gradient_checkpointing": True,
                                                 "checkpoint_layers": chosen.checkpoint_layers}}[chosen.checkpointing]
        planned = {**stored_training_config(config), "batch_size": chosen.micro_batch,
                   "gradient_accumulation_steps": chosen.accumulation, **setting}
        return self._setup_config(planned, n_train=len(self.train_rows),
                                  n_validation=len(self.dataset.validation.rows), base=self.base)

    def _setup_model(self, config: TrainingConfig, placement: Placement, base_model_dir: Path, base: BaseModelSpec,
                     *, pad_token_id: int) -> Any:
        """The base model with LoRA attached, continuing from the parent job's adapter when there is one."""
        request = ModelRequest(
            base_model_dir=base_model_dir, device=placement.device, dtype=placement.dtype,
            max_seq_len=config.max_seq_len, quantization=config.quantization, lora_r=config.lora_r,
            lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=lora_targets(config, base.family),
            gradient_checkpointing=_gradient_checkpointing(config, placement.device),
            checkpoint_layers=config.checkpoint_layers, pad_token_id=pad_token_id, seed=self.job.seed)
        self.context.event(f"Loading {base.id} with the {placement.backend} backend ({request.dtype}, "
                           f"quantization {request.quantization})")
        model = load_trainable_model(placement.backend, request)
        parent_job = parent_job_of(self.job.method)
        if parent_job is not None:
            parent_lora, weights = fetch_parent_adapter(self.runtime.store, self.context.tenant_id, parent_job,
                                                        self.work_dir / "parent")
            check_compatible(parent_lora, config.lora_r, request.target_modules)
            loaded = load_parent_weights(model, weights)
            self.context.event(f"Continuing from the adapter of job {parent_job} ({loaded} LoRA tensors)")
        return model

    def _setup_observers(self, metrics_dir: Path) -> RunObservers | None:
        """The run's reporter, sampler, stop watcher and checkpoint publisher: one set for every attempt."""
        from afina.trainer.callbacks import observe_run

        if not self.rank.is_main:
            return None  # rank 0 reports, publishes and watches for stops for every rank
        return observe_run(self.context, self.save_checkpoint, metrics_dir=metrics_dir, sync=self.sync)

    def _setup_trainer(self, config: TrainingConfig, placement: Placement, model: Any, tokenizer: Any,
                       train_rows: Rows, validation_rows: Rows, observers: RunObservers | None) -> Any:
        from datasets import Dataset
        from trl import SFTTrainer

        from afina.trainer.arguments import sft_arguments, trainer_callbacks
        from afina.trainer.callbacks import EarlyStepsCallback, FollowerCallback

        has_validation = bool(validation_rows)
        args = sft_arguments(config, self.output_dir, device=placement.device, seed=self.job.seed,
                             has_validation=has_validation, backend=placement.backend,
                             fused_kernels=self.kernels.enabled, world_size=self.rank.world_size)
        guard = loss_guard_callback(LossGuard(config.learning_rate))  # every rank sees the same (gathered) loss
        if observers is None:  # a rank other than 0
            assert self.sync is not None
            callbacks = [FollowerCallback(self.sync), guard, *trainer_callbacks(config)]
        else:
            callbacks = [observers.callback(), guard, EarlyStepsCallback(self._first_step_done, self._check_memory),
                         *trainer_callbacks(config)]
        return SFTTrainer(
            model=model, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(validation_rows) if has_validation else None,
            data_collator=PaddingFreeCollator() if config.packing else None,
            callbacks=callbacks,
        )

    # training --------------------------------------------------------------

    def train(self) -> None:
        """Train to the end; on CUDA out-of-memory, back off once: to the plan's next candidate (``speed: auto``)
        or, with ``oom_retry``, to half the micro-batch."""
        failure = self._train_catching_out_of_memory()
        if failure is None:
            return
        if self.rank.distributed:  # one rank rebuilding alone would leave the others waiting in a collective
            raise TrainingFailed(_oom_message(self.config, self.placement.backend,
                                              halve_micro_batch(self.config.batch_size,
                                                                self.config.gradient_accumulation_steps)),
                                 code="out_of_memory")
        # the rebuild happens here, outside the except clause: the exception's traceback held the failed step's
        # frames, and with them its activations, until that clause ended (seen on an H100: the back-off's new model
        # did not fit beside them)
        fallback = self.plan.fallback() if self.plan is not None else None
        smaller = halve_micro_batch(self.config.batch_size, self.config.gradient_accumulation_steps)
        if fallback is not None:
            self._back_off(fallback)
        elif self.config.oom_retry and smaller is not None:
            self._retry_smaller(*smaller)
        else:
            raise TrainingFailed(_oom_message(self.config, self.placement.backend, smaller), code="out_of_memory")
        if self._train_catching_out_of_memory() is not None:
            raise TrainingFailed(_oom_message(self.config, self.placement.backend, None), code="out_of_memory")

    def _train_catching_out_of_memory(self) -> str | None:
        """``_train_once``; a CUDA out-of-memory error comes back as its message (its traceback dropped), any
        other error propagates."""
        try:
            self._train_once()
        except Exception as exc:  # noqa: BLE001 - only CUDA OOM is handled, everything else re-raised
            if not is_out_of_memory(exc):
                raise
            message = str(exc)
            exc.__traceback__ = None
            log_event(log, "train.out_of_memory", job_id=self.context.job_id, error=message[:300])
            return message
        return None

    def _back_off(self, fallback: ThroughputPlan) -> None:
        """The plan's estimate was wrong for this GPU: rebuild the model and trainer with the next candidate."""
        self.context.event(f"CUDA out of memory with {self.plan.chosen.describe(fallback.num_layers)}: backing off "
                           f"once to {fallback.describe()}", level="warn")
        self.trainer = self.model = None
        release_gpu_memory()
        self.plan = fallback
        self.config = self._apply_plan(self.config, fallback)
        self.model = self._setup_model(self.config, self.placement, self.base_model_dir, self.base,
                                       pad_token_id=self.tokenizer.pad_token_id)
        self._restart_trainer()

    def _restart_trainer(self) -> None:
        """A new Trainer over ``self.model`` and ``self.config``, resuming from the newest published checkpoint."""
        shutil.rmtree(self.output_dir, ignore_errors=True)
        self.output_dir.mkdir(parents=True)
        self.resume_dir = self.load_checkpoint()
        self.trainer = self._setup_trainer(self.config, self.placement, self.model, self.tokenizer, self.train_rows,
                                           self.dataset.validation.rows, self.observers)

    def _first_step_done(self) -> None:
        self.phases.mark("first step")
        self.context.event(self.phases.summary())

    def _check_memory(self, step: int) -> None:
        """The measured peak of the first steps against the estimate the run was sized with."""
        if self.placement.device != "cuda":
            return
        import torch

        self.measured_peak = float(torch.cuda.max_memory_allocated())
        estimate = self.memory_estimate.total
        self.context.event(f"Memory check at step {step}: peak {self.measured_peak / GIB:.2f} GiB of GPU memory "
                           f"allocated, estimated {estimate / GIB:.2f} GiB "
                           f"({estimate / max(self.measured_peak, 1.0):.2f}× the peak)")

    def _retry_smaller(self, batch_size: int, gradient_accumulation_steps: int) -> None:
        """Free the failed run, then rebuild it with the same effective batch from the newest checkpoint."""
        self.context.event(f"CUDA out of memory at batch_size {self.config.batch_size}: retrying once with "
                           f"batch_size {batch_size} and gradient_accumulation_steps {gradient_accumulation_steps}",
                           level="warn")
        self.trainer = None
        release_gpu_memory()
        smaller = {**stored_training_config(self.config), "batch_size": batch_size,
                   "gradient_accumulation_steps": gradient_accumulation_steps}
        self.config = self._setup_config(smaller, n_train=len(self.train_rows),
                                         n_validation=len(self.dataset.validation.rows), base=self.base)
        self._restart_trainer()

    def _train_once(self) -> None:
        config, placement = self.config, self.placement
        packed = " (packed)" if config.packing else ""
        self.context.event(f"Training {self.base.id} with LoRA r={config.lora_r} on {placement.device} "
                           f"({placement.backend} backend): {config.total_steps} step(s), {config.n_epochs} "
                           f"epoch(s), batch size {config.batch_size}{packed}")
        started = time.monotonic()
        self.trainer.train(resume_from_checkpoint=str(self.resume_dir) if self.resume_dir else None)
        if self.observers is None:
            return  # a rank other than 0: rank 0 says how the run ended
        self.observers.stops.raise_if_stopped()
        state = self.trainer.state
        seconds = time.monotonic() - started
        median = self.observers.reporter.median_step_seconds()
        log_event(log, "train.finished", job_id=self.context.job_id, steps=state.global_step,
                  seconds=round(seconds, 2), median_step_s=round(median, 3), backend=placement.backend)
        self.context.event(f"Training finished at step {state.global_step} in {seconds:.1f} s "
                           f"(median {median:.2f} s a step)")

    def save_checkpoint(self, step: int, local_dir: Path, metrics: dict[str, Any]) -> None:
        """Publish the Trainer's checkpoint of ``step`` (upload, row, prune): the run's checkpoint publisher."""
        if self.rank.distributed:
            self._collect_rank_rng_states(local_dir)
        checkpoints.publish_checkpoint(self.runtime, self.context.tenant_id, self.context.job_id, step, local_dir,
                                       metrics, self.settings.checkpoint_keep_last, owner=self.context.owner)
        self.context.event(f"Checkpoint saved at step {step}")

    def _collect_rank_rng_states(self, local_dir: Path) -> None:
        """The other ranks' RNG states (``rng_state_<rank>.pth``, written in their own folders before the barrier
        the callbacks hold) go into rank 0's checkpoint, so a resumed rank restores its own."""
        for rank in range(1, self.rank.world_size):
            sibling = self.work_dir.parent / f"rank-{rank}" / "output" / local_dir.name / f"rng_state_{rank}.pth"
            if sibling.is_file():
                shutil.copy2(sibling, local_dir / sibling.name)

    def load_checkpoint(self) -> Path | None:
        """The newest usable checkpoint of an earlier attempt, downloaded into the output dir; None if none."""
        for ref in checkpoints.recorded_checkpoints(self.runtime, self.context.job_id):
            local_dir = self.output_dir / f"checkpoint-{ref.step}"
            try:
                checkpoints.download_checkpoint(self.runtime, ref, local_dir)
            except FileNotFoundError as exc:
                self.context.event(f"Checkpoint at step {ref.step} is unusable ({exc}); trying an older one",
                                   level="warn")
                shutil.rmtree(local_dir, ignore_errors=True)
                continue
            self.resumed_from = ref.step
            self.context.event(f"Resuming from checkpoint at step {ref.step}")
            return local_dir
        return None

    # results ---------------------------------------------------------------

    def save_adapter(self) -> None:
        """Upload the adapter and the tokenizer (stock template) to ``adapter_prefix``; its manifest last."""
        adapter_dir = self.work_dir / "adapter"
        self.trainer.model.save_pretrained(str(adapter_dir))
        point_adapter_at(adapter_dir, self.base)
        self.tokenizer.chat_template = self.base.family.stock_template
        self.tokenizer.save_pretrained(str(adapter_dir))
        state = self.trainer.state
        trained_tokens = int(state.num_input_tokens_seen)
        commit_adapter(self.runtime.store, adapter_prefix(self.context.tenant_id, self.context.job_id), adapter_dir,
                       job_id=self.context.job_id, base=self.base, global_step=state.global_step,
                       trained_tokens=trained_tokens)
        self.context.record_trained_tokens(trained_tokens)
        self.context.event(f"Adapter saved ({trained_tokens:,} tokens trained)")

    def save_report(self) -> None:
        """The report (Markdown, HTML, PDF, chart PNGs), step CSV and metrics JSONL files under the job's ``report/``,
        published as the job's result files."""
        from afina.trainer.metrics_files import HARDWARE_METRICS_FILE, TRAINING_METRICS_FILE
        from afina.trainer.monitor import describe_hardware

        self.observers.close()  # the last hardware sample: the report reads the files the observers wrote
        state = self.trainer.state
        facts = RunFacts(
            job_id=self.context.job_id, base_model=self.base.id, backend=self.placement.backend,
            device=self.placement.device, config=stored_training_config(self.config), manifest=self.dataset.manifest,
            dataset={"train": self.dataset.train.summary(), "validation": self.dataset.validation.summary()},
            log_history=state.log_history, global_step=state.global_step, max_steps=state.max_steps,
            trained_tokens=int(state.num_input_tokens_seen), wall_seconds=time.monotonic() - self.started,
            resumed_from=self.resumed_from, hardware=describe_hardware(), speed=self._speed_facts())
        files = build_report(facts, self.observers.files.read_bytes(TRAINING_METRICS_FILE),
                             self.observers.files.read_bytes(HARDWARE_METRICS_FILE))
        prefix = f"{job_prefix(self.context.tenant_id, self.context.job_id)}/report"
        store = self.runtime.store
        store.put_bytes(f"{prefix}/metrics.jsonl", metrics_jsonl(metric_records(state.log_history)))
        published = [(name, store.put_bytes(f"{prefix}/{name}", data)) for name, data in files.items()]
        # result_files, as OpenAI's API has them: downloadable with GET /v1/files/{id}/content
        with self.runtime.db.session() as session:
            file_ids = [repo.add_result_file(session, self.context.tenant_id, object_key=info.key, filename=name,
                                             size=info.size, sha256=info.sha256).id for name, info in published]
        self.context.record_result_files(file_ids)

    def _speed_facts(self) -> list[tuple[str, str]]:
        """The report's "Speed and memory" rows: the plan, the estimate against the measured peak, the kernels."""
        rows = []
        if self.plan is not None:
            rows.append(("throughput plan (speed auto)", self.plan.describe()))
            rows += [("note", note) for note in self.plan.notes]
        estimate = self.memory_estimate
        rows.append(("memory estimate", f"{estimate.total / GIB:.2f} GiB ({estimate.describe()})"))
        if self.measured_peak is not None:
            ratio = estimate.total / self.measured_peak
            rows.append(("measured peak (first steps)",
                         f"{self.measured_peak / GIB:.2f} GiB allocated (the estimate was {ratio:.2f}× the peak)"))
        kernels = self.kernels
        rows.append(("fused kernels", kernels.reason if kernels.enabled else f"no: {kernels.reason}"))
        if self.rank.distributed:
            split = split_batch(self.config.batch_size, self.config.gradient_accumulation_steps, self.rank.world_size)
            rows.append(("data parallel", f"{self.rank.world_size} processes (DDP): {split.describe()}"))
        if self.phases.marks and self.phases.marks[-1][0] == "first step":
            rows.append(("start-up", self.phases.summary()))
        return rows

    def cleanup(self) -> None:
        if self.observers is not None:
            self.observers.close()  # a last hardware sample (memory at a crash) and the metrics files' final upload
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.trainer = self.model = None
        release_gpu_memory()
        placement = getattr(self, "placement", None)  # a job that failed before choosing one has none
        if placement is not None and placement.device == "cuda":
            settle_heap()  # what the worker keeps warm for the next job, out of the next job's collections


def _visible_cuda_devices(device: str) -> int:
    """CUDA devices this worker sees (its ``CUDA_VISIBLE_DEVICES``), without creating a context; 0 off CUDA."""
    if device != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def release_gpu_memory() -> None:
    """Hand a finished run's cached GPU blocks back, so the worker's next job (and its plan) sees them free."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")  # a job that never imported torch has nothing to release
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# the settings a resolved config leaves to the worker ----------------------------------------------------------


def lora_targets(config: TrainingConfig, family: ChatFamily) -> tuple[str, ...]:
    """The modules LoRA adapts: the config's list, or the family's (every attention and MLP projection)."""
    chosen = config.target_modules
    if chosen is None or isinstance(chosen, str):  # None or "all-linear"
        return tuple(family.target_modules)
    return tuple(chosen)


def checkpoint_mode(config: TrainingConfig, backend: str) -> Checkpointing:
    """The plan's name for what ``config`` asks of activation checkpointing on ``backend`` (a CUDA run)."""
    if config.gradient_checkpointing is False:
        return "none"
    if backend == "unsloth" or config.gradient_checkpointing == "unsloth":
        return "offloaded"
    return "selective" if config.checkpoint_layers is not None else "full"


def _gradient_checkpointing(config: TrainingConfig, device: str) -> bool:
    """``auto``: on CUDA only, where memory is what a GPU lacks; a CPU run has RAM and wants speed."""
    if config.gradient_checkpointing == "auto":
        return device == "cuda"
    return config.gradient_checkpointing is not False


def _dtype_name(device: str) -> str:
    if device != "cuda":
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def _oom_message(config: TrainingConfig, backend: str, smaller: tuple[int, int] | None) -> str:
    if smaller is None:
        advice = ("set quantization 4bit, gradient_checkpointing true or a shorter max_seq_len, "
                  "or run on a GPU with more memory")
    else:
        advice = (f"set batch_size {smaller[0]} and gradient_accumulation_steps {smaller[1]} (the same "
                  f"effective batch), or enable hyperparameters.oom_retry to let afina retry that once")
    return (f"CUDA ran out of memory at batch_size {config.batch_size} × {config.max_seq_len} tokens with "
            f"the {backend} backend; {advice}")

