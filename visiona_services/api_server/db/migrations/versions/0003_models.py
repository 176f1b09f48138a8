"""models

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 09:50:52.212122
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import visiona_services.api_server.db.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column("declared_sha256", sa.String(length=64), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("object_key", sa.String(length=1024), nullable=False),
        sa.Column(
            "created_at",
            visiona_services.api_server.db.models.UtcDateTime(timezone=True),
            nullable=False,
        ),
        sa.Column(
            "upload_expires_at",
            visiona_services.api_server.db.models.UtcDateTime(timezone=True),
            nullable=False,
        ),
        sa.Column(
            "finalized_at",
            visiona_services.api_server.db.models.UtcDateTime(timezone=True),
            nullable=True,
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_models_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_models_upload_expires_at"), ["upload_expires_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_models_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_user_id"))
        batch_op.drop_index(batch_op.f("ix_models_upload_expires_at"))

    op.drop_table("models")
