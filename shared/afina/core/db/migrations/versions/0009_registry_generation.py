"""registry generation: one counter every write to api_keys, models or routes moves, by trigger

See ``afina.core.db.generation``: a gateway keeps those rows in memory while the counter is unchanged.
``migrate`` installs the triggers again after every upgrade (SQLite drops them when a later migration
rebuilds one of the tables); this revision installs them too, so a database at 0009 has them.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

from afina.core.db.generation import EVENTS, TABLES, install_generation_triggers

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'registry_generation',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('value', sa.BigInteger(), nullable=False),
    )
    op.execute("INSERT INTO registry_generation (id, value) VALUES (1, 0)")
    install_generation_triggers(op.get_bind())


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        for table in TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS afina_generation_{table} ON {table}")
        op.execute("DROP FUNCTION IF EXISTS afina_bump_registry_generation()")
    else:
        for table in TABLES:
            for event in EVENTS:
                op.execute(f"DROP TRIGGER IF EXISTS afina_generation_{table}_{event.lower()}")
    op.drop_table('registry_generation')
