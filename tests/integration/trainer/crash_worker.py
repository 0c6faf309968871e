"""A trainer process that hangs after publishing a given checkpoint, for the test to SIGKILL it.

``python -m tests.integration.trainer.crash_worker HOME MODEL_CACHE JOB_ID STEP MARKER``

It runs the real train stage through ``run_stage`` (lease, heartbeat and all); the only
change is that publishing the checkpoint of ``STEP`` is followed by writing ``MARKER``
and sleeping, so the kill lands at a known point: after that checkpoint, before the next
step. Everything the test then sees comes from a worker that died without cleaning up.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main(home: str, model_cache: str, job_id: str, step: str, marker: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from afina.core.queue.jobs import run_stage
    from afina.core.runtime import Runtime
    from afina.core.settings import Settings
    from afina.trainer import checkpoints
    from afina.trainer.recipe import train_job

    publish = checkpoints.publish_checkpoint

    def publish_then_hang(runtime, tenant, job, at_step, *args, **kwargs):  # noqa: ANN001, ANN202
        prefix = publish(runtime, tenant, job, at_step, *args, **kwargs)
        if at_step == int(step):
            Path(marker).write_text(prefix)
            time.sleep(3600)
        return prefix

    checkpoints.publish_checkpoint = publish_then_hang
    runtime = Runtime(Settings(home=Path(home), model_cache_dir=Path(model_cache), log_json=False))
    print(run_stage(runtime, job_id, "train", train_job), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:6])
