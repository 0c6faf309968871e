"""The registry's generation counter: one number every committed write to api_keys, models or routes moves.

A gateway keeps key grants, models and routes in memory and reads only this counter per request
(``afina.gateway.registry``). Database triggers move it, so every writer does, whichever process or
code path wrote (the CLI revoking a key, the exporter registering a model, a test's raw SQL), inside
the writer's own transaction: a committed revocation is seen by the very next read.

The table comes from migration 0009; the triggers are (re)installed by ``migrate`` on every start,
after the migrations ran, because SQLite drops a table's triggers when a migration rebuilds it
(``batch_alter_table``), and a later migration that did so would otherwise switch invalidation off
without a sound.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

TABLES = ("api_keys", "models", "routes")
EVENTS = ("INSERT", "UPDATE", "DELETE")
BUMP = "UPDATE registry_generation SET value = value + 1 WHERE id = 1"


def install_generation_triggers(connection: Connection) -> None:
    """Make sure every write to ``TABLES`` moves the counter (idempotent; cheap when they exist)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("CREATE OR REPLACE FUNCTION afina_bump_registry_generation() RETURNS trigger AS $$ "
                                f"BEGIN {BUMP}; RETURN NULL; END $$ LANGUAGE plpgsql"))
        # only the missing ones: creating a trigger locks its table against writers, on every process start
        present = set(connection.execute(text("SELECT tgname FROM pg_trigger WHERE tgname LIKE 'afina_generation_%' "
                                              "AND NOT tgisinternal")).scalars())
        for table in TABLES:
            if f"afina_generation_{table}" not in present:
                connection.execute(text(f"CREATE TRIGGER afina_generation_{table} AFTER INSERT OR UPDATE OR DELETE "
                                        f"ON {table} FOR EACH STATEMENT "
                                        "EXECUTE FUNCTION afina_bump_registry_generation()"))
        return
    for table in TABLES:
        for event in EVENTS:
            connection.execute(text(f"CREATE TRIGGER IF NOT EXISTS afina_generation_{table}_{event.lower()} "
                                    f"AFTER {event} ON {table} BEGIN {BUMP}; END"))
