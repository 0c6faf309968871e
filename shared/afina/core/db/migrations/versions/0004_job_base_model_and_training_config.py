"""a job's resolved base model and resolved training config, each stored once

Before this revision the resolved hyperparameters lived under ``hyperparameters["resolved"]`` and
a copy of the requested ones under ``method.supervised.hyperparameters``. The data migration moves
``resolved`` into ``training_config`` and drops the copy, keeping what the user asked for in
``hyperparameters`` (the copy fills it where the top level is empty). ``base_model`` stays null for
jobs created before: their stages resolve the name as they did (``job_base_model`` falls back).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

RESOLVED_KEY = 'resolved'


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('base_model', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('training_config', sa.JSON(), nullable=True))
    jobs = sa.table('jobs', sa.column('id', sa.String), sa.column('hyperparameters', sa.JSON),
                    sa.column('method', sa.JSON), sa.column('training_config', sa.JSON))
    bind = op.get_bind()
    for row in bind.execute(sa.select(jobs.c.id, jobs.c.hyperparameters, jobs.c.method)).all():
        hyperparameters = dict(row.hyperparameters or {})
        method = dict(row.method or {})
        supervised = dict(method.get('supervised') or {})
        copied = supervised.pop('hyperparameters', None) or {}
        resolved = hyperparameters.pop(RESOLVED_KEY, None)
        requested = {**{k: v for k, v in copied.items() if k != RESOLVED_KEY}, **hyperparameters}
        if supervised:
            method['supervised'] = supervised
        else:
            method.pop('supervised', None)
        method.setdefault('type', 'supervised')
        bind.execute(jobs.update().where(jobs.c.id == row.id).values(
            hyperparameters=requested, method=method,
            training_config=resolved if isinstance(resolved, dict) else None))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('training_config')
        batch_op.drop_column('base_model')
