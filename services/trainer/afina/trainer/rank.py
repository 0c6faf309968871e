"""One rank of a data-parallel run: ``python -m afina.trainer.rank LAUNCH_FILE``, started by torchrun.

The worker that holds the job's lease wrote ``LAUNCH_FILE`` (``distributed.Launch``) and waits
for torchrun; see ``afina.trainer.distributed`` for the whole design. This process runs the
recipe, then writes how it ended to its outcome file and exits: 0 when it finished, 1 otherwise
(so torchrun tears the other ranks down at once instead of leaving them in a collective).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from afina.core.logging import configure_logging, log_event
from afina.core.queue.jobs import JobContext
from afina.core.runtime import Runtime
from afina.trainer.distributed import FollowerContext, Launch, Outcome, RankInfo, RankSync, ddp_backend, write_outcome

log = logging.getLogger("afina.trainer")


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    launch = Launch.read(Path(argv[0]))
    rank = RankInfo.from_env()
    settings = launch.build_settings()
    configure_logging(settings.log_level, settings.log_json)
    runtime = Runtime(settings)
    context_type = JobContext if rank.is_main else FollowerContext
    context = context_type(runtime=runtime, job_id=launch.job_id, tenant_id=launch.tenant_id, stage=launch.stage,
                           owner=launch.owner)
    outcome = Outcome("done" if rank.is_main else "stopped")
    try:
        sync = start_process_group(rank, launch.device)
        from afina.trainer.recipe import run_recipe

        run_recipe(context, rank=rank, sync=sync)
    except BaseException as exc:  # noqa: BLE001 - every ending is reported to the worker, then the process exits
        outcome = Outcome.of(exc)
        log_event(log, "train.rank_failed", logging.WARNING, job_id=launch.job_id, rank=rank.rank, kind=outcome.kind,
                  error=outcome.message[:500])
    finally:
        context.close_events()
    write_outcome(Path(launch.outcomes_dir), rank.rank, outcome)
    return 0 if outcome.kind in ("done", "stopped") else 1


def start_process_group(rank: RankInfo, device: str) -> RankSync:
    """Join torchrun's group before the recipe needs it (``speed: auto`` agrees on the memory budget first);
    transformers' Trainer then uses this group. A CUDA rank is pinned to GPU ``LOCAL_RANK``."""
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(rank.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=ddp_backend(device))
    return RankSync(rank, device)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
