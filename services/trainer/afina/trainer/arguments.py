"""A resolved ``TrainingConfig`` turned into TRL's ``SFTConfig``: the one place that maps afina's names to TRL's.

Both backends train through TRL's ``SFTTrainer`` with these arguments, so a config
means the same run whichever backend executes it. Fields that shape the model rather
than the loop (``quantization``, ``target_modules``, ``backend``) are the backends'; the
ones about the data (``packing``, ``assistant_only_loss``, ``max_seq_len``) are applied
when the recipe builds its rows (labels are made by ``data.py``, TRL's own dataset
preparation is skipped). Early stopping is a callback (``trainer_callbacks``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from afina.core.errors import InvalidRequest
from afina.core.training import AUTO, CUDA_ONLY_OPTIMIZERS, TrainingConfig


def check_device_support(config: TrainingConfig, device: str) -> None:
    """Refuse, naming the field, what this device cannot run (bitsandbytes and Unsloth need CUDA)."""
    if device == "cuda":
        return
    if config.quantization != "none":
        raise InvalidRequest(f"quantization {config.quantization} loads the base weights with bitsandbytes, which "
                             f"needs a CUDA GPU; this worker runs on {device}: set quantization to none or run the "
                             f"job on a GPU worker", param="hyperparameters.quantization")
    if config.optimizer in CUDA_ONLY_OPTIMIZERS:
        raise InvalidRequest(f"optimizer {config.optimizer} needs a CUDA GPU (bitsandbytes); this worker runs on "
                             f"{device}: set optimizer to adamw_torch", param="hyperparameters.optimizer")
    if config.backend == "unsloth" or config.gradient_checkpointing == "unsloth":
        field = "backend" if config.backend == "unsloth" else "gradient_checkpointing"
        raise InvalidRequest(f"Unsloth needs a CUDA GPU; this worker runs on {device}: set backend to auto or hf "
                             f"(and gradient_checkpointing to auto)", param=f"hyperparameters.{field}")


def activation_checkpointing(config: TrainingConfig, device: str, backend: str | None = None) -> bool:
    """Whether the Trainer checkpoints activations: ``auto`` on CUDA only (a CPU run has RAM and wants speed);
    never for Unsloth, which sets its own (``"unsloth"``) on the model."""
    if backend == "unsloth" or config.gradient_checkpointing == "unsloth":
        return False
    if config.checkpoint_layers is not None:
        return False  # selective: the hf backend set it layer by layer; the Trainer would turn it on for all
    if config.gradient_checkpointing == AUTO:
        return device == "cuda"
    return bool(config.gradient_checkpointing)


def warmup(config: TrainingConfig) -> int | float:
    """transformers' ``warmup_steps``: a step count, or a float in [0, 1) read as a fraction of the run."""
    return config.warmup_steps if config.warmup_steps is not None else config.warmup_ratio


def sft_arguments(config: TrainingConfig, output_dir: Path, *, device: str, seed: int, has_validation: bool,
                  backend: str | None = None, fused_kernels: bool = False, world_size: int = 1) -> Any:
    """``SFTConfig`` for ``config`` on ``device`` (``cpu``/``cuda``); ``InvalidRequest`` naming the field for a
    setting this device or dataset cannot honour.

    ``world_size`` > 1 (one rank of a data-parallel run under torchrun): ``batch_size`` and
    ``gradient_accumulation_steps`` are the whole run's; each rank gets its share (``split_batch``).
    """
    import torch
    from trl import SFTConfig

    check_device_support(config, device)
    if config.early_stopping is not None and not has_validation:
        raise InvalidRequest("early stopping watches the validation loss, and this job has no validation example "
                             "to compute it on: give a validation_file or remove hyperparameters.early_stopping",
                             param="hyperparameters.early_stopping")
    cuda = device == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    # labels are built by data.py (assistant replies + EOS, weights, truncation), so TRL's own dataset
    # preparation is skipped; its collator pads input_ids with the pad token and labels with -100
    # transformers 5.2x renamed TrainingArguments.gradient_checkpointing to activation_checkpointing; the
    # GPU image's 5.17 still has the old name: pass whichever this install has
    fields = getattr(SFTConfig, "__dataclass_fields__", {})
    checkpointing_arg = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    checkpointing = {checkpointing_arg: activation_checkpointing(config, device, backend)}
    batches = batch_arguments(config, device, world_size, known_fields=set(fields))
    return SFTConfig(
        **checkpointing,
        **batches,
        output_dir=str(output_dir),
        seed=seed, data_seed=seed,
        num_train_epochs=config.n_epochs, max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler, warmup_steps=warmup(config),
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, optim=config.optimizer,
        logging_strategy="steps", logging_steps=config.logging_steps, logging_first_step=True,
        # the Trainer would otherwise log a NaN/inf step as the running average: the loss guard must see it
        logging_nan_inf_filter=False,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=config.eval_steps or config.steps_per_epoch,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=1,
        max_length=config.max_seq_len, dataset_kwargs={"skip_prepare_dataset": True},
        include_num_input_tokens_seen="non_padding",
        use_cpu=not cuda, bf16=bf16, fp16=cuda and not bf16,
        # on a GPU two loader processes collate the next batches while the GPU trains (~2% a step at
        # 4 × 2048 tokens); on a CPU they would only compete with training for the cores
        dataloader_num_workers=2 if cuda else 0, dataloader_persistent_workers=cuda,
        report_to=[], push_to_hub=False, disable_tqdm=True, log_level="warning",
        # Liger's Triton kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE), patched into the model by
        # the Trainer: decided by kernels.use_fused_kernels (CUDA, the hf backend, a model type Liger covers)
        use_liger_kernel=fused_kernels,
    )


def batch_arguments(config: TrainingConfig, device: str, world_size: int, *,
                    known_fields: set[str] | None = None) -> dict[str, Any]:
    """The batch and DDP fields of ``SFTConfig``: this rank's share of the effective batch (``split_batch``), and
    under torchrun (``world_size`` > 1) the process group's backend. ``known_fields``: the install's
    ``SFTConfig`` fields (a field it lacks is left out)."""
    from afina.trainer.distributed import ddp_backend, split_batch

    split = split_batch(config.batch_size, config.gradient_accumulation_steps, world_size)
    arguments: dict[str, Any] = {"per_device_train_batch_size": split.micro_batch,
                                 "per_device_eval_batch_size": split.micro_batch,
                                 "gradient_accumulation_steps": split.accumulation}
    if world_size > 1:
        # LoRA: every trainable parameter gets a gradient each step, so DDP need not search for unused ones;
        # a step's loss is normalized by the tokens of all ranks, so a rank's gradient is its share of the
        # whole effective batch's, as in one process
        arguments.update(ddp_backend=ddp_backend(device), ddp_find_unused_parameters=False)
        if known_fields is None or "average_tokens_across_devices" in known_fields:
            arguments["average_tokens_across_devices"] = True
    return arguments


def trainer_callbacks(config: TrainingConfig) -> list[Any]:
    """The callbacks the config asks for beyond the recipe's own: early stopping."""
    if config.early_stopping is None:
        return []
    from afina.trainer.early_stopping import EarlyStoppingOnValidationLoss

    return [EarlyStoppingOnValidationLoss(config.early_stopping.patience, config.early_stopping.threshold)]

