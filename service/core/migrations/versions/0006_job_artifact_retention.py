"""jobs.artifact_bytes (job results count against the tenant's storage quota) and when and why a
job's artifacts were removed (retention, a search keeping its best candidates, the user)

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('artifact_bytes', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('artifacts_removed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('artifacts_removed_reason', sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('artifacts_removed_reason')
        batch_op.drop_column('artifacts_removed_at')
        batch_op.drop_column('artifact_bytes')
