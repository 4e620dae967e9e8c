"""Admin API: admin tokens, webhook deliveries, the discarded state, query indexes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 08:19:45.085685
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


STATES_0001 = (
    "state IN ('received', 'rejected', 'duplicate', 'queued', 'forwarded', 'quarantined')"
)
STATES_0003 = (
    "state IN ('received', 'rejected', 'duplicate', 'queued', 'forwarded', "
    "'quarantined', 'discarded')"
)


def upgrade() -> None:
    op.create_table('admin_tokens',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('admin_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('display_prefix', sa.String(length=16), nullable=False),
    sa.Column('label', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['admin_id'], ['admins.id'], name=op.f('fk_admin_tokens_admin_id_admins'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_admin_tokens')),
    sa.UniqueConstraint('digest', name=op.f('uq_admin_tokens_digest'))
    )
    with op.batch_alter_table('admin_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_admin_tokens_admin_id'), ['admin_id'], unique=False)

    op.create_table('webhook_deliveries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('site_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('orthanc_study_id', sa.String(length=44), nullable=True),
    sa.Column('instance_count', sa.Integer(), nullable=False),
    sa.Column('url', sa.String(length=2048), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('pending', 'delivered', 'failed')", name=op.f('ck_webhook_deliveries_state_known')),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_webhook_deliveries_site_id_sites')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries'))
    )
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_webhook_deliveries_due', ['state', 'next_attempt_at'], unique=False)
        batch_op.create_index('uq_webhook_deliveries_event', ['site_id', 'study_instance_uid', 'instance_count', 'url'], unique=True)

    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_uploads_state_known'), type_='check')
        batch_op.create_check_constraint('state_known', STATES_0003)
        batch_op.add_column(sa.Column('discarded_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_uploads_patient_id', ['patient_id'], unique=False)
        batch_op.create_index('ix_uploads_received', ['received_at', 'id'], unique=False)
        batch_op.create_index('ix_uploads_site_study', ['site_id', 'study_instance_uid'], unique=False)
        batch_op.create_index('ix_uploads_state_received', ['state', 'received_at'], unique=False)
        # The admin log's filters by Series UID and by Orthanc series/study/patient ID.
        for column in ('series_instance_uid', 'orthanc_series_id', 'orthanc_study_id',
                       'orthanc_patient_id'):
            batch_op.create_index(op.f(f'ix_uploads_{column}'), [column], unique=False)



def downgrade() -> None:
    # The older schema has no "discarded" state: such rows go back to quarantine.
    op.execute("UPDATE uploads SET state = 'quarantined' WHERE state = 'discarded'")
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        for column in ('series_instance_uid', 'orthanc_series_id', 'orthanc_study_id',
                       'orthanc_patient_id'):
            batch_op.drop_index(op.f(f'ix_uploads_{column}'))
        batch_op.drop_index('ix_uploads_state_received')
        batch_op.drop_index('ix_uploads_site_study')
        batch_op.drop_index('ix_uploads_received')
        batch_op.drop_index('ix_uploads_patient_id')
        batch_op.drop_column('discarded_at')
        batch_op.drop_constraint(op.f('ck_uploads_state_known'), type_='check')
        batch_op.create_check_constraint('state_known', STATES_0001)

    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index('uq_webhook_deliveries_event')
        batch_op.drop_index('ix_webhook_deliveries_due')

    op.drop_table('webhook_deliveries')
    with op.batch_alter_table('admin_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_admin_tokens_admin_id'))

    op.drop_table('admin_tokens')
