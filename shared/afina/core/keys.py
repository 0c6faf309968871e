"""What an API key grants: its tenant, its scopes, and its rate limits.

A key made for an app that only chats gets ``inference``; a training pipeline ``fine-tune``; whoever
moves aliases and manages routes ``admin``. A key from before scopes existed has all three. Limits
are per key, per minute: requests, and tokens (prompt + completion); None means the gateway's
default (``settings.key_requests_per_minute`` / ``key_tokens_per_minute``), itself None for none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Scope = Literal["inference", "fine-tune", "admin"]
ALL_SCOPES: tuple[Scope, ...] = get_args(Scope)


def check_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[Scope, ...]:
    """The scopes, checked and deduplicated in a fixed order; ValueError naming an unknown one."""
    unknown = [scope for scope in scopes if scope not in ALL_SCOPES]
    if unknown or not scopes:
        raise ValueError(f"scopes are some of {', '.join(ALL_SCOPES)}; got {', '.join(unknown) or 'none'}")
    return tuple(scope for scope in ALL_SCOPES if scope in scopes)


@dataclass(frozen=True)
class KeyGrant:
    """The authenticated caller of one request."""

    tenant_id: str
    prefix: str  # names the key in limits, logs and metrics; never the key itself
    scopes: tuple[Scope, ...] = ALL_SCOPES
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    expires_at: int | None = None  # epoch seconds (None: never): a grant held in memory ends with its key

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes

    def expired(self, moment: float) -> bool:
        return self.expires_at is not None and self.expires_at <= moment
