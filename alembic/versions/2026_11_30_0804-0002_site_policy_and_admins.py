"""Site policy, shared usage counters, upload slots, admin accounts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 08:04:50.882304
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('admins',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_admins')),
    sa.UniqueConstraint('name', name=op.f('uq_admins_name'))
    )
    op.create_table('site_usage',
    sa.Column('site_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('window', sa.String(length=8), nullable=False),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_site_usage_site_id_sites'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('site_id', 'window', 'window_start', name=op.f('pk_site_usage'))
    )
    op.create_table('upload_slots',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('site_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('holder', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_upload_slots_site_id_sites'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_upload_slots'))
    )
    with op.batch_alter_table('upload_slots', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_upload_slots_site_id'), ['site_id'], unique=False)

    with op.batch_alter_table('site_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_used_ip', sa.String(length=64), nullable=True))

    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('allowed_cidrs', sa.JSON(), server_default=sa.text("'[]'"), nullable=False))
        batch_op.add_column(sa.Column('allowed_modalities', sa.JSON(), server_default=sa.text("'[]'"), nullable=False))
        batch_op.add_column(sa.Column('allowed_sop_classes', sa.JSON(), server_default=sa.text("'[]'"), nullable=False))
        batch_op.add_column(sa.Column('max_instance_bytes', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('instances_per_minute', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('bytes_per_day', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('max_concurrent_uploads', sa.Integer(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.drop_column('max_concurrent_uploads')
        batch_op.drop_column('bytes_per_day')
        batch_op.drop_column('instances_per_minute')
        batch_op.drop_column('max_instance_bytes')
        batch_op.drop_column('allowed_sop_classes')
        batch_op.drop_column('allowed_modalities')
        batch_op.drop_column('allowed_cidrs')
        batch_op.drop_column('deleted_at')

    with op.batch_alter_table('site_tokens', schema=None) as batch_op:
        batch_op.drop_column('last_used_ip')

    with op.batch_alter_table('upload_slots', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_upload_slots_site_id'))

    op.drop_table('upload_slots')
    op.drop_table('site_usage')
    op.drop_table('admins')
