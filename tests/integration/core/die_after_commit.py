"""A process that dies right after a commit that calls for a queue message, before the message reaches the broker.

``python -m tests.integration.core.die_after_commit HOME TENANT FILE_ID``: a gateway that commits a
new job (the real ``create_job`` of the gateway's fine-tuning service).

``python -m tests.integration.core.die_after_commit handoff HOME JOB_ID``: an ingest worker that runs
the job's real ingest stage (``run_stage`` with ``prepare_dataset``) and commits the handoff to train.

The only change in either is that handing the committed message to the broker is replaced by
``os._exit``: the process vanishes between the commit and the send, as a SIGKILL or a power cut
would leave it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def die(*_args: object, **_kwargs: object) -> None:
    print("committed; dying before the send", flush=True)
    os._exit(137)


def handoff(home: str, job_id: str) -> None:
    from afina.core.queue import outbox
    from afina.core.queue.jobs import run_stage
    from afina.core.runtime import Runtime
    from afina.core.settings import Settings
    from afina.ingest.prepare import prepare_dataset

    outbox.deliver = die
    outcome = run_stage(Runtime(Settings(home=Path(home), log_json=False)), job_id, "ingest", prepare_dataset)
    print(f"run_stage returned {outcome!r}: the process was meant to die first", flush=True)
    sys.exit(1)


def main(home: str, tenant: str, file_id: str) -> None:
    from afina.core.queue import outbox
    from afina.core.runtime import Runtime
    from afina.core.settings import Settings
    from afina.gateway.fine_tuning import service
    from afina.gateway.fine_tuning.protocol import CreateJobRequest

    outbox.deliver = die
    runtime = Runtime(Settings(home=Path(home), log_json=False))
    service.create_job(runtime, tenant, CreateJobRequest(model="smollm2-135m-instruct", training_file=file_id,
                                                         suffix="orphan"))
    print("create_job returned: the process was meant to die first", flush=True)
    sys.exit(1)


if __name__ == "__main__":
    if sys.argv[1] == "handoff":
        handoff(*sys.argv[2:4])
    else:
        main(*sys.argv[1:4])
