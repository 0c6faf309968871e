"""A data-parallel rank (``afina.trainer.rank``) whose rank 0 hangs after publishing a given checkpoint, once.

The data-parallel resume test points the worker's ``RANK_MODULE`` here. Each rank writes its PID
to ``$AFINA_TEST_DDP_DIR/rank-<N>.pid``; rank 0, after the checkpoint of ``$AFINA_TEST_DDP_STEP`` is
published (objects and row), writes ``$AFINA_TEST_DDP_DIR/hung`` and sleeps, so the test can SIGKILL
rank 1 at a known point: after that checkpoint, before the next step. A later launch finds
``hung`` and trains normally: it is the restart the test checks.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> int:
    from afina.trainer import checkpoints
    from afina.trainer.rank import main as rank_main

    folder = Path(os.environ["AFINA_TEST_DDP_DIR"])
    step = int(os.environ["AFINA_TEST_DDP_STEP"])
    marker = folder / "hung"
    (folder / f"rank-{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    publish = checkpoints.publish_checkpoint

    def publish_then_hang(runtime, tenant, job, at_step, *args, **kwargs):  # noqa: ANN001, ANN202
        prefix = publish(runtime, tenant, job, at_step, *args, **kwargs)
        if at_step == step and not marker.exists():
            marker.write_text(prefix)
            time.sleep(3600)
        return prefix

    checkpoints.publish_checkpoint = publish_then_hang
    return rank_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
