"""export options on jobs, re-export jobs (kind), publication records on models (Ollama, the Hub)

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='fine_tune'))
        batch_op.add_column(sa.Column('export_options', sa.JSON(), nullable=True))
        batch_op.create_index('ix_jobs_kind', ['kind'])
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ollama', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('hub', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('hub')
        batch_op.drop_column('ollama')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_kind')
        batch_op.drop_column('export_options')
        batch_op.drop_column('kind')
