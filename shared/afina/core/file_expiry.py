"""File expiry as OpenAI's Files API has it: ``expires_after`` on an upload, ``output_expires_after`` on a batch,
``expires_at`` on the file object, and a sweeper that deletes what ran out.

What is promised:

- ``expires_at = created_at + seconds``, both read from the database's clock when the row is written (the one
  clock every gateway and worker host shares, ``afina.core.db.clock``); ``anchor`` is ``created_at``, the only
  anchor OpenAI has. A ``purpose=batch`` upload without ``expires_after`` expires after 30 days, as OpenAI's do;
  other files are kept until deleted.
- Past ``expires_at`` a file is gone at once for the API: not listed, and retrieving it, its content, or naming
  it in a new job or batch answers as for an unknown file (``repository.get_file`` leaves it out).
- The sweeper (every worker's maintenance loop, ``sweep_expired_files``) then deletes its bytes from the store
  and its row. A file that an active job (fine-tune, batch, export or evaluation: ``validating_files``,
  ``queued`` or ``running``) names as its ``training_file`` or ``validation_file`` is kept until that job ends:
  the job's worker may still read it (OpenAI gives no rule here; a running job must not lose its input).
- Several sweepers at once delete each file once: a file is claimed by one conditional ``DELETE`` of its row
  (still there, expired, not needed), the store delete runs before that transaction commits, and a store
  failure rolls the row back for the next sweep, so no bytes are ever left without a row that names them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from afina.core.db import repository as repo
from afina.core.logging import log_event

if TYPE_CHECKING:
    from afina.core.runtime import Runtime

log = logging.getLogger("afina.files")

MIN_EXPIRES_AFTER_S = 3600  # 1 hour
MAX_EXPIRES_AFTER_S = 30 * 24 * 3600  # 30 days
BATCH_FILE_EXPIRES_AFTER_S = MAX_EXPIRES_AFTER_S  # a purpose=batch upload with no expires_after
SWEEP_BATCH = 200  # files one sweep looks at; the next sweep takes the rest


class ExpiresAfter(BaseModel):
    """OpenAI's file expiration policy: ``seconds`` after the file's ``created_at``."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(strict=True, ge=MIN_EXPIRES_AFTER_S, le=MAX_EXPIRES_AFTER_S,
                         description="between 3600 (1 hour) and 2592000 (30 days)")


def sweep_expired_files(runtime: Runtime, *, limit: int = SWEEP_BATCH) -> list[str]:
    """Delete the bytes and rows of expired files no active job needs; the ids this call deleted.

    Each file is its own transaction, so one store failure (logged, kept for the next sweep) does not stop the
    rest, and a file another sweeper took meanwhile is skipped.
    """
    with runtime.db.session() as session:
        candidates = repo.expired_file_ids(session, limit)
    swept = []
    for file_id in candidates:
        try:
            with runtime.db.session() as session:
                claimed = repo.claim_expired_file(session, file_id)
                if claimed is None:
                    continue  # another sweeper deleted it, a job took it up, or its expiry moved
                tenant_id, object_key = claimed
                runtime.store.delete(object_key)  # before the commit: a failure rolls the row's deletion back
        except Exception:  # noqa: BLE001 - the row stays; the next sweep tries again
            log.warning("file.expiry_failed", exc_info=True,
                        extra={"fields": {"file_id": file_id, "outcome": "kept for the next sweep"}})
            continue
        swept.append(file_id)
        log_event(log, "file.expired", file_id=file_id, tenant=tenant_id)
    return swept
