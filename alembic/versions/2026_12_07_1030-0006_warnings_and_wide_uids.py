"""Warnings on an upload's row, and UID columns as wide as Orthanc's identifiers.

Orthanc stores files whose UIDs break PS3.5 (over 64 characters and so on) and files
without a SOP Class UID; the intake now takes them with a warning instead of refusing
them, so its UID columns hold up to 256 characters (Orthanc's own limit, measured).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 10:30:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UPLOAD_UIDS = ('sop_class_uid', 'sop_instance_uid', 'series_instance_uid', 'study_instance_uid')


def upgrade() -> None:
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('warnings', sa.JSON(), nullable=True))
        for column in _UPLOAD_UIDS:
            batch_op.alter_column(
                column, existing_type=sa.String(length=64), type_=sa.String(length=256)
            )
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.alter_column(
            'study_instance_uid',
            existing_type=sa.String(length=64),
            type_=sa.String(length=256),
            existing_nullable=False,
        )


def downgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.alter_column(
            'study_instance_uid',
            existing_type=sa.String(length=256),
            type_=sa.String(length=64),
            existing_nullable=False,
        )
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        for column in _UPLOAD_UIDS:
            batch_op.alter_column(
                column, existing_type=sa.String(length=256), type_=sa.String(length=64)
            )
        batch_op.drop_column('warnings')
