"""The database's clock, for every time that several hosts compare (leases, outbox claims).

Each worker host has its own clock; a lease written with one host's ``time.time()`` and
judged expired by another's lets two workers run one job when their clocks drift apart.
Every lease and claim deadline is therefore computed and compared in SQL, on the one clock
all hosts share: the database server's.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Float, cast, func, literal, select
from sqlalchemy.orm import Session

# seconds between the Julian day epoch and the Unix epoch, as SQLite's julianday() counts
_UNIX_EPOCH_JULIAN_DAY = 2440587.5


def epoch_now(dialect_name: str) -> ColumnElement[float]:
    """SQL for "now" in epoch seconds on the database server (sub-second precision)."""
    if dialect_name == "postgresql":
        return cast(func.extract("epoch", func.clock_timestamp()), Float)
    if dialect_name == "sqlite":  # julianday('now') carries milliseconds
        return (func.julianday("now") - literal(_UNIX_EPOCH_JULIAN_DAY)) * literal(86400.0)
    raise NotImplementedError(f"no database clock for dialect {dialect_name!r}")


def now_sql(session: Session) -> ColumnElement[float]:
    """``epoch_now`` for the dialect ``session`` is bound to."""
    return epoch_now(session.get_bind().dialect.name)


def database_time(session: Session) -> float:
    """The database server's clock now, in epoch seconds."""
    return float(session.execute(select(now_sql(session))).scalar_one())
