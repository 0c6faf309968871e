"""outbox for queue messages; API key expiry, revocation time and name

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'outbox',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('task', sa.String(length=128), nullable=False),
        sa.Column('queue', sa.String(length=64), nullable=False),
        sa.Column('subject_id', sa.String(length=40), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('available_at', sa.Float(), nullable=False),
        sa.Column('claimed_until', sa.Float(), nullable=True),
        sa.Column('sent_at', sa.Float(), nullable=True),
        sa.Column('send_attempts', sa.Integer(), nullable=False, server_default='0'),
    )
    op.create_index('ix_outbox_pending', 'outbox', ['sent_at', 'available_at'])
    op.create_index('ix_outbox_subject_id', 'outbox', ['subject_id'])
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('revoked_at', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('name', sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('name')
        batch_op.drop_column('revoked_at')
        batch_op.drop_column('expires_at')
    op.drop_index('ix_outbox_subject_id', table_name='outbox')
    op.drop_index('ix_outbox_pending', table_name='outbox')
    op.drop_table('outbox')
