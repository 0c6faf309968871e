"""The LoRA supervised fine-tuning recipe: the whole train stage of a job, top to bottom.

``train_job`` is the stage function ``run_stage`` calls. The recipe follows the
torchtune protocol: ``setup`` (each ``_setup_*`` returns one object), ``train``,
``save_checkpoint`` / ``load_checkpoint``, ``save_adapter``, ``cleanup``.

A run can die anywhere (a SIGKILLed worker, a lost lease): every checkpoint is
in the store before its database row exists, and a new attempt starts by
downloading the newest one and resuming optimizer, scheduler, RNG and step from
it. The adapter is committed by writing ``afina_adapter.json`` last; a stage that
finds it skips straight to export.

Backend: transformers + PEFT + TRL's ``SFTTrainer`` on any device. Unsloth on
CUDA is the planned second backend, chosen by configuration.
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
from afina.core.queue.jobs import JobCancelled, JobContext
from afina.trainer import checkpoints
from afina.trainer.config import (
    TrainingConfig,
    requested_hyperparameters,
    requested_max_seq_len,
    resolve_hyperparameters,
    with_resolved,
)
from afina.trainer.data import (
    EncodedSplit,
    PreparedDataset,
    check_template_parity,
    encode_split,
    encode_training_split,
    load_prepared_dataset,
)
from afina.trainer.report import metric_records, metrics_jsonl, render_report, step_metrics_csv

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
        return self.runtime.store.exists(f"{adapter_prefix(self.context.job_id)}/{ADAPTER_MARKER}")

    # setup -----------------------------------------------------------------

    def setup(self) -> None:
        context = self.context
        context.set_status("running", message="Fine-tuning job started")
        shutil.rmtree(self.work_dir, ignore_errors=True)  # a dead attempt's files; the store has what counts
        self.output_dir.mkdir(parents=True)
        self.spec = resolve_base_model(self.job.model)
        self.prepared = self._setup_prepared_dataset()  # before the model: a bad dataset fails in a second
        self.device = self._setup_device()
        self.base_model_dir = self._setup_base_model()
        self.tokenizer = self._setup_tokenizer()
        context.check_continue()
        self.dataset = self._setup_data()
        self.config = self._setup_config()
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
        return materialize_base_model(self.spec, self.settings.resolved_model_cache_dir)

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
        return load_prepared_dataset(self.runtime.store, self.job.dataset_key)

    def _setup_data(self) -> EncodedDataset:
        prepared = self.prepared
        requested = requested_hyperparameters(self.job.hyperparameters, self.job.method)
        max_seq_len = requested_max_seq_len(requested, self.spec.context_length)
        template = self.spec.family.training_template
        check_template_parity(self.tokenizer, prepared.train, template)
        train = encode_training_split(self.tokenizer, prepared.train, template, max_seq_len)
        validation = encode_split(self.tokenizer, prepared.validation, template, max_seq_len)
        dropped = f"; {train.dropped} dropped with nothing to train on" if train.dropped else ""
        self.context.event(f"Dataset tokenized: {len(train.rows)} training example(s), {train.tokens:,} tokens "
                           f"({train.trained_tokens:,} trained), {len(validation.rows)} validation example(s)"
                           f"{dropped}; {train.truncated} truncated to {max_seq_len} tokens")
        if prepared.validation and not validation.rows:
            self.context.event("No validation example has an assistant token within max_seq_len; "
                               "validation loss will not be reported", level="warn")
        return EncodedDataset(manifest=prepared.manifest, train=train, validation=validation)

    def _setup_config(self) -> TrainingConfig:
        requested = requested_hyperparameters(self.job.hyperparameters, self.job.method)
        config = resolve_hyperparameters(requested, len(self.dataset.train.rows), self.spec.context_length)
        public = config.public()
        stored = with_resolved(self.job.hyperparameters, config)
        if stored != self.job.hyperparameters:
            self.context.update(hyperparameters=stored)
        self.context.event("Hyperparameters: " + ", ".join(f"{k}={v}" for k, v in public.items()
                                                           if v is not None))
        return config

    def _setup_model(self) -> Any:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, set_seed

        if self.device == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
        set_seed(self.job.seed)  # the LoRA init is random: same seed, same run
        model = AutoModelForCausalLM.from_pretrained(str(self.base_model_dir), dtype=dtype)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        lora = LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha,
                          lora_dropout=self.config.lora_dropout,
                          target_modules=list(self.spec.family.target_modules), bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, lora)

    def _setup_trainer(self) -> Any:
        import torch
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from afina.trainer.callbacks import JobProgressCallback

        config = self.config
        has_validation = bool(self.dataset.validation.rows)
        cuda = self.device == "cuda"
        bf16 = cuda and torch.cuda.is_bf16_supported()
        # labels are built by data.py (assistant replies + EOS, weights, truncation), so TRL's own dataset
        # preparation is skipped; its collator pads input_ids with the pad token and labels with -100
        args = SFTConfig(
            output_dir=str(self.output_dir),
            seed=self.job.seed, data_seed=self.job.seed,
            num_train_epochs=config.n_epochs, max_steps=config.max_steps or -1,
            per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            learning_rate=config.learning_rate, lr_scheduler_type="linear", warmup_steps=config.warmup_ratio,
            weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
            logging_strategy="steps", logging_steps=config.logging_steps, logging_first_step=True,
            eval_strategy="steps" if has_validation else "no", eval_steps=config.steps_per_epoch,
            save_strategy="steps", save_steps=config.save_steps, save_total_limit=1,
            max_length=config.max_seq_len, dataset_kwargs={"skip_prepare_dataset": True},
            include_num_input_tokens_seen="non_padding",
            use_cpu=not cuda, bf16=bf16, fp16=cuda and not bf16, activation_checkpointing=cuda,
            dataloader_num_workers=0, report_to=[], push_to_hub=False, disable_tqdm=True, log_level="warning",
        )
        self.callback = JobProgressCallback(self.context, self.save_checkpoint)
        return SFTTrainer(
            model=self.model, args=args, processing_class=self.tokenizer,
            train_dataset=Dataset.from_list(self.dataset.train.rows),
            eval_dataset=Dataset.from_list(self.dataset.validation.rows) if has_validation else None,
            callbacks=[self.callback],
        )

    # training --------------------------------------------------------------

    def train(self) -> None:
        steps = self.config.total_steps
        self.context.event(f"Training {self.spec.id} with LoRA r={self.config.lora_r} on {self.device}: "
                           f"{steps} step(s), {self.config.n_epochs} epoch(s), batch size {self.config.batch_size}")
        started = time.monotonic()
        self.trainer.train(resume_from_checkpoint=str(self.resume_dir) if self.resume_dir else None)
        if self.callback.cancelled:
            raise JobCancelled(self.context.job_id)
        state = self.trainer.state
        seconds = time.monotonic() - started
        per_step = sorted(self.callback.step_seconds)
        median = per_step[len(per_step) // 2] if per_step else 0.0
        log_event(log, "train.finished", job_id=self.context.job_id, steps=state.global_step,
                  seconds=round(seconds, 2), median_step_s=round(median, 3))
        self.context.event(f"Training finished at step {state.global_step} in {seconds:.1f} s "
                           f"(median {median:.2f} s a step)")

    def save_checkpoint(self, step: int, local_dir: Path, metrics: dict[str, Any]) -> None:
        """Publish the Trainer's checkpoint of ``step`` (upload, row, prune); called by the callback."""
        checkpoints.publish_checkpoint(self.runtime, self.context.job_id, step, local_dir, metrics,
                                       self.settings.checkpoint_keep_last)
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
        prefix = adapter_prefix(self.context.job_id)
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
        """The Markdown report and the metrics JSONL under ``jobs/<id>/report/``."""
        state = self.trainer.state
        records = metric_records(state.log_history)
        report = render_report(
            job_id=self.context.job_id, base_model=self.spec.id, device=self.device, config=self.config.public(),
            dataset={"train": self.dataset.train.summary(), "validation": self.dataset.validation.summary()},
            records=records, global_step=state.global_step, trained_tokens=int(state.num_input_tokens_seen),
            wall_seconds=time.monotonic() - self.started, resumed_from=self.resumed_from)
        prefix = f"{job_prefix(self.context.job_id)}/report"
        store = self.runtime.store
        store.put_bytes(f"{prefix}/metrics.jsonl", metrics_jsonl(records))
        published = [("step_metrics.csv", store.put_bytes(f"{prefix}/step_metrics.csv", step_metrics_csv(records))),
                     ("report.md", store.put_bytes(f"{prefix}/report.md", report.encode()))]
        # result_files, as OpenAI's API has them: downloadable with GET /v1/files/{id}/content
        with self.runtime.db.session() as session:
            file_ids = [repo.add_result_file(session, self.context.tenant_id, object_key=info.key, filename=name,
                                             size=info.size, sha256=info.sha256).id for name, info in published]
        self.context.update(result_files=file_ids)

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _point_adapter_at(adapter_dir: Path, spec: BaseModelSpec) -> None:
    """Name the base model by its public repo id, not this worker's cache path."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = spec.hf_repo
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
