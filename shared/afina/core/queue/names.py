"""Queue and task names: the only contract between services besides the database and the store."""

from __future__ import annotations

QUEUE_INGEST = "ingest"
QUEUE_TRAIN = "train"
QUEUE_EXPORT = "export"
QUEUE_EVALUATE = "evaluate"
QUEUE_BATCH = "batch"

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
