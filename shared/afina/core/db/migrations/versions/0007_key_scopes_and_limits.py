"""API key scopes and per-key rate limits

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scopes', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('requests_per_minute', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tokens_per_minute', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('tokens_per_minute')
        batch_op.drop_column('requests_per_minute')
        batch_op.drop_column('scopes')
