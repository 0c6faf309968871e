"""captured exchanges: a route's chats kept (redacted) for retraining, with their feedback

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'captured_exchanges',
        sa.Column('id', sa.String(length=40), primary_key=True),
        sa.Column('tenant_id', sa.String(length=64), sa.ForeignKey('tenants.id'), nullable=False),
        sa.Column('route', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.BigInteger(), nullable=False),
        sa.Column('seq', sa.BigInteger(), nullable=False),
        sa.Column('target', sa.String(length=600), nullable=False),
        sa.Column('model', sa.String(length=600), nullable=False),
        sa.Column('messages', sa.JSON(), nullable=False),
        sa.Column('answer', sa.Text(), nullable=False),
        sa.Column('finish_reason', sa.String(length=16), nullable=False),
        sa.Column('feedback', sa.String(length=8), nullable=True),
        sa.Column('correction', sa.Text(), nullable=True),
        sa.Column('used_in_job', sa.String(length=40), nullable=True),
    )
    op.create_index('ix_captured_exchanges_route', 'captured_exchanges', ['tenant_id', 'route', 'used_in_job'])
    op.create_index('ix_captured_exchanges_seq', 'captured_exchanges', ['tenant_id', 'route', 'seq'])


def downgrade() -> None:
    op.drop_index('ix_captured_exchanges_seq', table_name='captured_exchanges')
    op.drop_index('ix_captured_exchanges_route', table_name='captured_exchanges')
    op.drop_table('captured_exchanges')
