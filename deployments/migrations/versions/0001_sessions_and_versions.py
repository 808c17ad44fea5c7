"""Sessions (a token hash each) and their versions (lineage by parent, prompt, settings, stats and
the content hashes of image and mask in the blob store).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("home", sa.String(64), nullable=True),  # the editor replica that holds its caches
    )
    op.create_table(
        "versions",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # creation order
        sa.Column("id", sa.String(32), nullable=False, unique=True),
        sa.Column("session_id", sa.String(32), sa.ForeignKey("sessions.id"), nullable=False, index=True),
        sa.Column("parent_id", sa.String(32), nullable=True),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),  # generation: seed, steps...; edit: mode, capture
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("mask_sha256", sa.String(64), nullable=True),
        sa.Column("stats", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("versions")
    op.drop_table("sessions")
