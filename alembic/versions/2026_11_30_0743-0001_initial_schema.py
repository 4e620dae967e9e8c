"""Initial schema: sites, site token digests, the intake log.

Revision ID: 0001
Revises:
Create Date: 2026-11-30 07:43:43.190202
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('sites',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sites')),
    sa.UniqueConstraint('name', name=op.f('uq_sites_name'))
    )
    op.create_table('site_tokens',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('site_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('display_prefix', sa.String(length=16), nullable=False),
    sa.Column('label', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_site_tokens_site_id_sites'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_site_tokens')),
    sa.UniqueConstraint('digest', name=op.f('uq_site_tokens_digest'))
    )
    with op.batch_alter_table('site_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_site_tokens_site_id'), ['site_id'], unique=False)

    op.create_table('uploads',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('receipt', sa.String(length=32), nullable=False),
    sa.Column('site_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('remote_addr', sa.String(length=64), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('byte_size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=True),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('patient_id', sa.String(length=256), nullable=True),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=True),
    sa.Column('modality', sa.String(length=16), nullable=True),
    sa.Column('orthanc_instance_id', sa.String(length=44), nullable=True),
    sa.Column('orthanc_series_id', sa.String(length=44), nullable=True),
    sa.Column('orthanc_study_id', sa.String(length=44), nullable=True),
    sa.Column('orthanc_patient_id', sa.String(length=44), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('orthanc_status', sa.String(length=32), nullable=True),
    sa.Column('duplicate_of_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('failed_answers', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('forwarded_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('spool_name', sa.String(length=64), nullable=True),
    sa.CheckConstraint("state IN ('received', 'rejected', 'duplicate', 'queued', 'forwarded', 'quarantined')", name=op.f('ck_uploads_state_known')),
    sa.ForeignKeyConstraint(['duplicate_of_id'], ['uploads.id'], name=op.f('fk_uploads_duplicate_of_id_uploads')),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_uploads_site_id_sites')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_uploads')),
    sa.UniqueConstraint('receipt', name=op.f('uq_uploads_receipt'))
    )
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.create_index('ix_uploads_due', ['state', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_uploads_orthanc_instance_id'), ['orthanc_instance_id'], unique=False)
        batch_op.create_index('ix_uploads_site_received', ['site_id', 'received_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_uploads_sop_instance_uid'), ['sop_instance_uid'], unique=False)
        batch_op.create_index(batch_op.f('ix_uploads_study_instance_uid'), ['study_instance_uid'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_uploads_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_uploads_sop_instance_uid'))
        batch_op.drop_index('ix_uploads_site_received')
        batch_op.drop_index(batch_op.f('ix_uploads_orthanc_instance_id'))
        batch_op.drop_index('ix_uploads_due')

    op.drop_table('uploads')
    with op.batch_alter_table('site_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_site_tokens_site_id'))

    op.drop_table('site_tokens')
    op.drop_table('sites')
