"""files: ingest options, status details, dataset version and ingest state

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ingest_options', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('status_details', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('dataset_key', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('ingest_state', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.drop_column('ingest_state')
        batch_op.drop_column('dataset_key')
        batch_op.drop_column('status_details')
        batch_op.drop_column('ingest_options')
