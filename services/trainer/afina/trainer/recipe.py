"""The LoRA supervised fine-tuning recipe: the whole train stage of a job, top to bottom.

``train_job`` is the stage function ``run_stage`` calls. The recipe follows the
torchtune protocol: ``setup`` (each ``_setup_*`` returns one object), ``train``,
``save_checkpoint`` / ``load_checkpoint``, ``save_adapter``, ``cleanup``.

A run can die anywhere (a SIGKILLed worker, a lost lease): every checkpoint is
in the store before its database row exists, and a new attempt starts by
downloading the newest one and resuming optimizer, scheduler, RNG and step from
it. The adapter is committed by writing ``afina_adapter.json`` last; a stage that
finds it skips straight to export.

Backends (``backends/``): ``hf`` (transformers + PEFT, any device) or ``unsloth`` (CUDA), chosen by
``hyperparameters.backend``; only the model loading differs, both train through TRL's ``SFTTrainer``
with the same rows, callbacks and checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from afina.core.catalog import BaseModelSpec, resolve_base_model
from afina.core.datasets.layout import adapter_prefix, job_prefix
from afina.core.db import repository as repo
from afina.core.db.models import Job
from afina.core.errors import TrainingFailed
from afina.core.logging import log_event
from afina.core.queue.drain import WorkerDraining
from afina.core.queue.jobs import JobCancelled, JobContext
from afina.core.training import (
    TrainingConfig,
    requested_hyperparameters,
    requested_max_seq_len,
    resolve_hyperparameters,
    with_resolved,
)
from afina.trainer import checkpoints
from afina.trainer.backends import BackendName, ModelRequest, choose_backend, load_trainable_model, prepare_backend
from afina.trainer.data import (
    EncodedSplit,
    PreparedDataset,
    check_template_parity,
    encode_split,
    encode_training_split,
    load_prepared_dataset,
)
from afina.trainer.guards import LossGuard, is_out_of_memory, loss_guard_callback
from afina.trainer.packing import PaddingFreeCollator, pack_rows
from afina.trainer.parent import check_compatible, fetch_parent_adapter, load_parent_weights, parent_job_of
from afina.trainer.preflight import (
    GIB,
    MemoryEstimate,
    ModelShape,
    Resources,
    RunShape,
    check_fits,
    checkpoint_bytes,
    halve_micro_batch,
)
from afina.trainer.report import RunFacts, build_report, metric_records, metrics_jsonl

log = logging.getLogger("afina.trainer")

ADAPTER_MARKER = "afina_adapter.json"
NEXT_STAGE = "export"


@dataclass(frozen=True)
class EncodedDataset:
    """The job's dataset, tokenized and labelled, with the manifest it came from."""

    manifest: dict[str, Any]
    train: EncodedSplit
    validation: EncodedSplit


def train_job(context: JobContext) -> str:
    """Run the train stage of ``context.job_id``; returns the next stage (``export``)."""
    recipe = LoRAFinetuneRecipe(context)
    try:
        if recipe.adapter_committed():
            context.event("Adapter already trained by an earlier attempt; moving on to export")
            return NEXT_STAGE
        recipe.setup()
        recipe.train()
        recipe.save_adapter()
        recipe.save_report()
    finally:
        recipe.cleanup()
    return NEXT_STAGE


class LoRAFinetuneRecipe:
    """One LoRA SFT run of one job."""

    def __init__(self, context: JobContext) -> None:
        self.context = context
        self.runtime = context.runtime
        self.settings = context.runtime.settings
        self.job: Job = context.snapshot()
        self.work_dir = self.settings.resolved_work_dir / context.job_id
        self.output_dir = self.work_dir / "output"
        self.started = time.monotonic()
        self.resumed_from: int | None = None

    def adapter_committed(self) -> bool:
        prefix = adapter_prefix(self.context.tenant_id, self.context.job_id)
        return self.runtime.store.exists(f"{prefix}/{ADAPTER_MARKER}")

    # setup -----------------------------------------------------------------

    def setup(self) -> None:
        context = self.context
        context.set_status("running", message="Fine-tuning job started")
        shutil.rmtree(self.work_dir, ignore_errors=True)  # a dead attempt's files; the store has what counts
        self.output_dir.mkdir(parents=True)
        self.requested = requested_hyperparameters(self.job.hyperparameters, self.job.method)
        self.spec = resolve_base_model(self.job.model, chat_family=self.requested.get("chat_family"),
                                       store=self.runtime.store)
        self.prepared = self._setup_prepared_dataset()  # before the model: a bad dataset fails in a second
        self.device = self._setup_device()
        self.backend = self._setup_backend()  # before the tokenizer: Unsloth must be imported before transformers
        self.base_model_dir = self._setup_base_model()
        self.tokenizer = self._setup_tokenizer()
        context.check_continue()
        self.dataset = self._setup_data()
        self.train_rows = self._setup_train_rows()
        self.config = self._setup_config()
        self.memory_estimate = self._setup_preflight()
        context.check_continue()
        self.model = self._setup_model()
        self.resume_dir = self.load_checkpoint()
        self.trainer = self._setup_trainer()

    def _setup_device(self) -> str:
        import torch

        wanted = self.settings.trainer_device
        if wanted == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if wanted == "cuda" and not torch.cuda.is_available():
            raise TrainingFailed("AFINA_TRAINER_DEVICE=cuda but this worker sees no CUDA device; "
                                 "set AFINA_TRAINER_DEVICE=auto or cpu, or run the job on a GPU worker")
        return wanted

    def _setup_base_model(self) -> Path:
        from afina.core.hfmodels import materialize_base_model

        self.context.event(f"Preparing base model {self.spec.id}")
        return materialize_base_model(self.spec, self.settings.resolved_model_cache_dir, store=self.runtime.store)

    def _setup_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.base_model_dir))
        # the tokenizer keeps the STOCK template: that is what the adapter ships with and the export serves
        tokenizer.chat_template = self.spec.family.stock_template
        if tokenizer.eos_token != self.spec.family.eos_token:
            raise TrainingFailed(f"{self.spec.id}: tokenizer EOS is {tokenizer.eos_token!r}, the catalog says "
                                 f"{self.spec.family.eos_token!r}")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            # pad == EOS would mask EOS out of the loss and the model would never learn to stop
            raise TrainingFailed(f"{self.spec.id}: pad token must differ from EOS; rebuild the model cache")
        return tokenizer

    def _setup_prepared_dataset(self) -> PreparedDataset:
        return load_prepared_dataset(self.runtime.store, self.job.dataset_key,
                                     self.runtime.settings.data_encryption_key)

    def _setup_data(self) -> EncodedDataset:
        prepared = self.prepared
        max_seq_len = requested_max_seq_len(self.requested, self.spec.context_length)
        template = self.spec.family.training_template
        check_template_parity(self.tokenizer, prepared.train, template)
        assistant_only = bool(self._option("assistant_only_loss", True))
        train = encode_training_split(self.tokenizer, prepared.train, template, max_seq_len,
                                      assistant_only=assistant_only)
        validation = encode_split(self.tokenizer, prepared.validation, template, max_seq_len,
                                  assistant_only=assistant_only)
        dropped = f"; {train.dropped} dropped with nothing to train on" if train.dropped else ""
        self.context.event(f"Dataset tokenized: {len(train.rows)} training example(s), {train.tokens:,} tokens "
                           f"({train.trained_tokens:,} trained), {len(validation.rows)} validation example(s)"
                           f"{dropped}; {train.truncated} truncated to {max_seq_len} tokens")
        if prepared.validation and not validation.rows:
            self.context.event("No validation example has an assistant token within max_seq_len; "
                               "validation loss will not be reported", level="warn")
        return EncodedDataset(manifest=prepared.manifest, train=train, validation=validation)

    def _setup_backend(self) -> BackendName:
        backend = choose_backend(str(self._option("backend", "auto")), self.device)
        prepare_backend(backend)
        return backend

    def _setup_train_rows(self) -> list[dict[str, list[int]]]:
        """The rows the trainer iterates: the encoded examples, or bins of them when ``packing`` is on."""
        rows = self.dataset.train.rows
        if not self._option("packing", False):
            return rows
        max_seq_len = requested_max_seq_len(self.requested, self.spec.context_length)
        packed, summary = pack_rows(rows, max_seq_len)
        self.context.event(f"Packed {summary.examples} example(s) into {summary.rows} row(s) of up to "
                           f"{max_seq_len} tokens ({summary.fill:.0%} filled)")
        return packed

    def _setup_config(self) -> TrainingConfig:
        # with packing, a "training example" of the batch rules is a packed row
        config = resolve_hyperparameters(self.requested, len(self.train_rows), self.spec.context_length,
                                         n_validation=len(self.dataset.validation.rows),
                                         default_target_modules=self.spec.family.target_modules)
        self._publish_config(config)
        return config

    def _publish_config(self, config: TrainingConfig) -> None:
        public = config.public()
        stored = with_resolved(self.job.hyperparameters, config)
        if stored != self.job.hyperparameters:
            self.context.update(hyperparameters=stored)
            self.job.hyperparameters = stored
        self.context.event("Hyperparameters: " + ", ".join(f"{k}={v}" for k, v in public.items()
                                                           if v is not None))

    def _setup_preflight(self) -> MemoryEstimate:
        """Refuse, with a setting that would fit, a run this worker cannot hold (before loading the model)."""
        model_shape = ModelShape.from_config_file(self.base_model_dir / "config.json")
        run_shape = self._run_shape(self.config)
        resources = Resources.measure(self.device, self.work_dir)
        disk_needed = checkpoint_bytes(model_shape, run_shape) * 2
        estimate = check_fits(model_shape, run_shape, resources, disk_needed=disk_needed)
        where = "GPU memory" if self.device == "cuda" else "RAM"
        self.context.event(f"Preflight: about {estimate.total / GIB:.1f} GiB of {where} needed "
                           f"({estimate.describe()})")
        return estimate

    def _run_shape(self, config: TrainingConfig) -> RunShape:
        if self._option("packing", False):
            longest = config.max_seq_len
        else:
            longest = max(len(row["input_ids"]) for row in self.train_rows)
        return RunShape(backend=self.backend, device=self.device, dtype=self._dtype_name(),
                        quantization=str(self._option("quantization", "none")), batch_size=config.batch_size,
                        gradient_accumulation_steps=config.gradient_accumulation_steps, tokens_per_row=longest,
                        gradient_checkpointing=self._gradient_checkpointing(), lora_r=config.lora_r,
                        target_modules=self._target_modules())

    def _setup_model(self) -> Any:
        request = ModelRequest(
            base_model_dir=self.base_model_dir, device=self.device, dtype=self._dtype_name(),
            max_seq_len=self.config.max_seq_len, quantization=str(self._option("quantization", "none")),
            lora_r=self.config.lora_r, lora_alpha=self.config.lora_alpha, lora_dropout=self.config.lora_dropout,
            target_modules=self._target_modules(), gradient_checkpointing=self._gradient_checkpointing(),
            pad_token_id=self.tokenizer.pad_token_id, seed=self.job.seed)
        self.context.event(f"Loading {self.spec.id} with the {self.backend} backend ({request.dtype}, "
                           f"quantization {request.quantization})")
        model = load_trainable_model(self.backend, request)
        parent_job = parent_job_of(self.job.method)
        if parent_job is not None:
            config, weights = fetch_parent_adapter(self.runtime.store, self.context.tenant_id, parent_job,
                                                   self.work_dir / "parent")
            check_compatible(config, self.config.lora_r, request.target_modules)
            loaded = load_parent_weights(model, weights)
            self.context.event(f"Continuing from the adapter of job {parent_job} ({loaded} LoRA tensors)")
        return model

    def _setup_trainer(self) -> Any:
        from datasets import Dataset
        from trl import SFTTrainer

        from afina.trainer.arguments import sft_arguments, trainer_callbacks
        from afina.trainer.callbacks import JobProgressCallback

        has_validation = bool(self.dataset.validation.rows)
        args = sft_arguments(self.config, self.output_dir, device=self.device, seed=self.job.seed,
                             has_validation=has_validation, backend=self.backend)
        self.callback = JobProgressCallback(self.context, self.save_checkpoint, metrics_dir=self.work_dir / "metrics")
        self.loss_guard = LossGuard(self.config.learning_rate)
        collator = PaddingFreeCollator() if self._option("packing", False) else None
        return SFTTrainer(
            model=self.model, args=args, processing_class=self.tokenizer,
            train_dataset=Dataset.from_list(self.train_rows),
            eval_dataset=Dataset.from_list(self.dataset.validation.rows) if has_validation else None,
            data_collator=collator, callbacks=[self.callback, loss_guard_callback(self.loss_guard),
                                               *trainer_callbacks(self.config)],
        )

    # options not (yet) in every TrainingConfig: read from the resolved config, else what the job asked for

    def _option(self, name: str, default: Any) -> Any:
        config = getattr(self, "config", None)
        if config is not None and hasattr(config, name):
            return getattr(config, name)
        value = self.requested.get(name, default)
        return default if value is None else value

    def _dtype_name(self) -> str:
        if self.device != "cuda":
            return "float32"
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"

    def _gradient_checkpointing(self) -> bool:
        wanted = self._option("gradient_checkpointing", "auto")
        if wanted in ("auto", None):
            return self.device == "cuda"  # memory is what a GPU lacks; a CPU run has RAM and wants speed
        return wanted not in (False, "false")

    def _target_modules(self) -> tuple[str, ...]:
        chosen = self._option("target_modules", None)
        if chosen in (None, "all-linear", "auto"):
            return tuple(self.spec.family.target_modules)
        return tuple(chosen)

    # training --------------------------------------------------------------

    def train(self) -> None:
        """Train to the end; on CUDA out-of-memory, retry once with half the micro-batch if allowed."""
        try:
            self._train_once()
        except Exception as exc:  # noqa: BLE001 - only CUDA OOM is handled, everything else re-raised
            if not is_out_of_memory(exc):
                raise
            smaller = halve_micro_batch(self.config.batch_size, self.config.gradient_accumulation_steps)
            if not self._option("oom_retry", False) or smaller is None:
                raise TrainingFailed(self._oom_message(smaller), code="out_of_memory") from exc
            self._retry_smaller(*smaller)
            try:
                self._train_once()
            except Exception as again:  # noqa: BLE001
                if is_out_of_memory(again):
                    raise TrainingFailed(self._oom_message(None), code="out_of_memory") from again
                raise

    def _oom_message(self, smaller: tuple[int, int] | None) -> str:
        config = self.config
        if smaller is None:
            advice = ("set quantization 4bit, gradient_checkpointing true or a shorter max_seq_len, "
                      "or run on a GPU with more memory")
        else:
            advice = (f"set batch_size {smaller[0]} and gradient_accumulation_steps {smaller[1]} (the same "
                      f"effective batch), or enable hyperparameters.oom_retry to let afina retry that once")
        return (f"CUDA ran out of memory at batch_size {config.batch_size} × {config.max_seq_len} tokens with "
                f"the {self.backend} backend; {advice}")

    def _retry_smaller(self, batch_size: int, gradient_accumulation_steps: int) -> None:
        """Free the failed run, then rebuild it with the same effective batch from the newest checkpoint."""
        import gc

        import torch

        self.context.event(f"CUDA out of memory at batch_size {self.config.batch_size}: retrying once with "
                           f"batch_size {batch_size} and gradient_accumulation_steps {gradient_accumulation_steps}",
                           level="warn")
        self.trainer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        smaller = {**self.config.public(), "batch_size": batch_size,
                   "gradient_accumulation_steps": gradient_accumulation_steps, "save_steps": self.config.save_steps}
        self.config = resolve_hyperparameters(smaller, len(self.train_rows), self.spec.context_length)
        self._publish_config(self.config)
        shutil.rmtree(self.output_dir, ignore_errors=True)
        self.output_dir.mkdir(parents=True)
        self.resume_dir = self.load_checkpoint()
        self.trainer = self._setup_trainer()

    def _train_once(self) -> None:
        steps = self.config.total_steps
        packed = " (packed)" if self._option("packing", False) else ""
        self.context.event(f"Training {self.spec.id} with LoRA r={self.config.lora_r} on {self.device} "
                           f"({self.backend} backend): {steps} step(s), {self.config.n_epochs} epoch(s), "
                           f"batch size {self.config.batch_size}{packed}")
        started = time.monotonic()
        self.trainer.train(resume_from_checkpoint=str(self.resume_dir) if self.resume_dir else None)
        if self.callback.cancelled:
            raise JobCancelled(self.context.job_id)
        if self.callback.draining:
            raise WorkerDraining(self.context.job_id)
        state = self.trainer.state
        seconds = time.monotonic() - started
        per_step = sorted(self.callback.step_seconds)
        median = per_step[len(per_step) // 2] if per_step else 0.0
        log_event(log, "train.finished", job_id=self.context.job_id, steps=state.global_step,
                  seconds=round(seconds, 2), median_step_s=round(median, 3), backend=self.backend)
        self.context.event(f"Training finished at step {state.global_step} in {seconds:.1f} s "
                           f"(median {median:.2f} s a step)")

    def save_checkpoint(self, step: int, local_dir: Path, metrics: dict[str, Any]) -> None:
        """Publish the Trainer's checkpoint of ``step`` (upload, row, prune); called by the callback."""
        checkpoints.publish_checkpoint(self.runtime, self.context.tenant_id, self.context.job_id, step, local_dir,
                                       metrics, self.settings.checkpoint_keep_last, owner=self.context.owner)
        self.context.event(f"Checkpoint saved at step {step}")

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
        """Upload the adapter and the tokenizer (stock template) to ``adapter_prefix``; marker last."""
        adapter_dir = self.work_dir / "adapter"
        self.trainer.model.save_pretrained(str(adapter_dir))
        _point_adapter_at(adapter_dir, self.spec)
        self.tokenizer.chat_template = self.spec.family.stock_template
        self.tokenizer.save_pretrained(str(adapter_dir))
        state = self.trainer.state
        prefix = adapter_prefix(self.context.tenant_id, self.context.job_id)
        store = self.runtime.store
        store.delete_prefix(prefix + "/")
        store.upload_dir(adapter_dir, prefix)
        marker = {"job_id": self.context.job_id, "base_model": self.spec.id, "hf_repo": self.spec.hf_repo,
                  "chat_family": self.spec.family.name, "global_step": state.global_step,
                  "trained_tokens": state.num_input_tokens_seen, "lora": {
                      "r": self.config.lora_r, "alpha": self.config.lora_alpha,
                      "dropout": self.config.lora_dropout, "target_modules": list(self.spec.family.target_modules)},
                  "files": sorted(p.relative_to(adapter_dir).as_posix() for p in adapter_dir.rglob("*")
                                  if p.is_file())}
        store.put_bytes(f"{prefix}/{ADAPTER_MARKER}", orjson.dumps(marker, option=orjson.OPT_INDENT_2))
        self.context.update(trained_tokens=int(state.num_input_tokens_seen))
        self.context.event(f"Adapter saved ({state.num_input_tokens_seen:,} tokens trained)")

    def save_report(self) -> None:
        """The report (Markdown, HTML, chart PNGs), step CSV and metrics JSONL files under ``jobs/<id>/report/``,
        published as the job's result files."""
        from afina.trainer.metrics_files import HARDWARE_METRICS_FILE, TRAINING_METRICS_FILE
        from afina.trainer.monitor import describe_hardware

        self.callback.close()  # the last hardware sample: the report reads the files the callback wrote
        state = self.trainer.state
        facts = RunFacts(
            job_id=self.context.job_id, base_model=self.spec.id, backend=self.backend, device=self.device,
            config=self.config.public(), manifest=self.dataset.manifest,
            dataset={"train": self.dataset.train.summary(), "validation": self.dataset.validation.summary()},
            log_history=state.log_history, global_step=state.global_step, max_steps=state.max_steps,
            trained_tokens=int(state.num_input_tokens_seen), wall_seconds=time.monotonic() - self.started,
            resumed_from=self.resumed_from, hardware=describe_hardware())
        files = build_report(facts, self.callback.files.read_bytes(TRAINING_METRICS_FILE),
                             self.callback.files.read_bytes(HARDWARE_METRICS_FILE))
        prefix = f"{job_prefix(self.context.tenant_id, self.context.job_id)}/report"
        store = self.runtime.store
        store.put_bytes(f"{prefix}/metrics.jsonl", metrics_jsonl(metric_records(state.log_history)))
        published = [(name, store.put_bytes(f"{prefix}/{name}", data)) for name, data in files.items()]
        # result_files, as OpenAI's API has them: downloadable with GET /v1/files/{id}/content
        with self.runtime.db.session() as session:
            file_ids = [repo.add_result_file(session, self.context.tenant_id, object_key=info.key, filename=name,
                                             size=info.size, sha256=info.sha256).id for name, info in published]
        self.context.update(result_files=file_ids)

    def cleanup(self) -> None:
        callback = getattr(self, "callback", None)
        if callback is not None:
            callback.close()  # a last hardware sample (memory at a crash) and the metrics files' final upload
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _point_adapter_at(adapter_dir: Path, spec: BaseModelSpec) -> None:
    """Name the base model by its public repo id, not this worker's cache path."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = spec.hf_repo
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
