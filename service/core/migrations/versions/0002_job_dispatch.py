"""jobs.dispatched_at: when a queued job was handed to the broker (fair dispatch across tenants)

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))
    # Jobs queued before this revision already have their broker message.
    op.execute("UPDATE jobs SET dispatched_at = created_at WHERE status IN ('queued', 'running')")


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('dispatched_at')
