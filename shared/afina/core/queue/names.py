"""Queue and task names: the only contract between services besides the database and the store."""

from __future__ import annotations

import re

QUEUE_INGEST = "ingest"
QUEUE_TRAIN = "train"
QUEUE_EXPORT = "export"
QUEUE_EVALUATE = "evaluate"
QUEUE_BATCH = "batch"
# a GPU class's train queue is "train.<class>" (afina.core.gpu_classes); "x<N>" is the GPU-count suffix, not a class
GPU_CLASS_NAME = r"[a-z0-9][a-z0-9-]{0,31}"
GPU_COUNT_SUFFIX = r"x[0-9]+"

TASK_PREPARE_DATASET = "afina.ingest.prepare_dataset"
TASK_TRAIN = "afina.trainer.train"
TASK_EXPORT = "afina.exporter.export"
TASK_EVALUATE = "afina.evaluator.evaluate"
TASK_RUN_BATCH = "afina.gateway.run_batch"  # a /v1/batches batch, answered by the gateway's own serving
TASK_INGEST_FILE = "afina.ingest.ingest_file"  # an uploaded fine-tune file, before any job uses it

# which task and queue carry a job in each stage (used to enqueue and to recover)
STAGE_TASKS: dict[str, tuple[str, str]] = {
    "ingest": (TASK_PREPARE_DATASET, QUEUE_INGEST),
    "train": (TASK_TRAIN, QUEUE_TRAIN),
    "export": (TASK_EXPORT, QUEUE_EXPORT),
    "evaluate": (TASK_EVALUATE, QUEUE_EVALUATE),
    "batch": (TASK_RUN_BATCH, QUEUE_BATCH),
}

# the Python module holding each service's task bodies (a worker imports only its own)
SERVICE_TASK_MODULES: dict[str, str] = {
    "ingest": "afina.ingest.tasks",
    "trainer": "afina.trainer.tasks",
    "exporter": "afina.exporter.tasks",
    "evaluator": "afina.evaluator.tasks",
    "batcher": "afina.gateway.batches.tasks",  # the gateway's package: batches run on its serving code
}

SERVICE_QUEUES: dict[str, str] = {"ingest": QUEUE_INGEST, "trainer": QUEUE_TRAIN, "exporter": QUEUE_EXPORT,
                                  "evaluator": QUEUE_EVALUATE, "batcher": QUEUE_BATCH}


def train_queue(gpu_class: str | None, num_gpus: int = 1) -> str:
    """The queue of a train stage on ``gpu_class`` (None: the default class) with ``num_gpus`` GPUs."""
    queue = QUEUE_TRAIN if gpu_class is None else f"{QUEUE_TRAIN}.{gpu_class}"
    return queue if num_gpus <= 1 else f"{queue}.x{num_gpus}"


def is_gpu_class_name(name: str) -> bool:
    """A name that can be a part of a queue name and is not read as a GPU count."""
    return re.fullmatch(GPU_CLASS_NAME, name) is not None and re.fullmatch(GPU_COUNT_SUFFIX, name) is None
