"""A gateway process that dies right after committing a new job, before its message reaches the broker.

``python -m tests.integration.core.die_after_commit HOME TENANT FILE_ID``

It runs the real ``create_job`` of the gateway's fine-tuning service; the only change is
that handing the committed message to the broker is replaced by ``os._exit``: the process
vanishes between the commit and the send, as a SIGKILL or a power cut would leave it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(home: str, tenant: str, file_id: str) -> None:
    from afina.core.queue import outbox
    from afina.core.runtime import Runtime
    from afina.core.settings import Settings
    from afina.gateway.fine_tuning import service
    from afina.gateway.fine_tuning.protocol import CreateJobRequest

    def die(*_args: object, **_kwargs: object) -> None:
        print("committed; dying before the send", flush=True)
        os._exit(137)

    outbox.deliver = die
    runtime = Runtime(Settings(home=Path(home), log_json=False))
    service.create_job(runtime, tenant, CreateJobRequest(model="smollm2-135m-instruct", training_file=file_id,
                                                         suffix="orphan"))
    print("create_job returned: the process was meant to die first", flush=True)
    sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
