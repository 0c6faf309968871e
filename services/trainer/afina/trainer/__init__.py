"""afina trainer: LoRA supervised fine-tuning of catalog models, one job at a time per worker.

The stage entry point is :func:`afina.trainer.recipe.train_job`; the Celery task in
:mod:`afina.trainer.tasks` only hands a job id to it under a lease.
"""
