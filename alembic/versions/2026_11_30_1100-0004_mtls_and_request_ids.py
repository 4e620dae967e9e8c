"""Mutual TLS: a site may be bound to one client certificate (SHA-256 of its DER);
uploads keep the ID of the request that brought them (log correlation).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 11:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.add_column(sa.Column('client_cert_sha256', sa.String(length=64), nullable=True))
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('request_id', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.drop_column('request_id')
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.drop_column('client_cert_sha256')
