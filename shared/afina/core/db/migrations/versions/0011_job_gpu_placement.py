"""where a job trains: its GPU class (asked for, or chosen by the trainer's preflight) and its GPU count

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('gpu_class', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('num_gpus', sa.Integer(), server_default='1', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('num_gpus')
        batch_op.drop_column('gpu_class')
