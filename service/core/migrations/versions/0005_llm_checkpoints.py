"""models.llm (a Hugging Face causal-LM checkpoint's description) and datasets.kind (arrays or text)

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('models', sa.Column('llm', sa.JSON(), nullable=True))
    op.add_column('datasets', sa.Column('kind', sa.String(length=16), nullable=False, server_default='arrays'))


def downgrade() -> None:
    op.drop_column('datasets', 'kind')
    op.drop_column('models', 'llm')
