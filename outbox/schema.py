"""The tables as SQLAlchemy Core objects: what the migrations must build (a test compares them
with a migrated database) and what Python code may query with."""
from sqlalchemy import (BigInteger, Boolean, CheckConstraint, Column, DateTime, Float, ForeignKey, Identity,
                        Index, Integer, LargeBinary, MetaData, String, Table, Text, UniqueConstraint, text)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

metadata = MetaData()

STATUSES = ("queued", "running", "done", "failed", "cancelled")
_status_check = "status IN ('queued', 'running', 'done', 'failed', 'cancelled')"


# The tenant rule of outbox/jobs.py's TENANT_PATTERN, in the database (migration 0003).
_tenant_check = "tenant_id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$'"


def _now():
    return text("now()")


def _current_timestamp():
    return text("CURRENT_TIMESTAMP")


image_assets = Table(
    "image_assets", metadata,
    Column("image_asset_id", UUID(as_uuid=False), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("tenant_id", String(255), nullable=False),
    Column("uri", Text, nullable=False),
    Column("mime_type", Text),
    Column("byte_size", BigInteger),
    Column("sha256", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_current_timestamp()),
    CheckConstraint(_tenant_check, name="image_assets_tenant_id_format"),
)

jobs = Table(
    "jobs", metadata,
    Column("job_id", UUID(as_uuid=False), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("tenant_id", String(255), nullable=False),
    Column("status", Text, nullable=False, server_default=text("'queued'::text")),
    Column("current_step", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_current_timestamp()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=_current_timestamp()),
    # The variant set (migration 0003): how many variants the generator will write, and when the
    # set was closed; the fan-in waits for the close.
    Column("expected_variants", Integer, CheckConstraint("expected_variants >= 1")),
    Column("variants_closed_at", DateTime(timezone=True)),
    CheckConstraint(_status_check),
    CheckConstraint(_tenant_check, name="jobs_tenant_id_format"),
    Index("jobs_status_idx", "status"),
    Index("jobs_current_step_idx", "current_step"),
    Index("jobs_updated_at_idx", "updated_at"),
    Index("jobs_created_at_idx", "created_at"),  # newest first, for the listings (migration 0004)
)

job_inputs = Table(
    "job_inputs", metadata,
    Column("job_id", UUID(as_uuid=False), ForeignKey("jobs.job_id", ondelete="CASCADE"), primary_key=True),
    Column("ad_copy", Text, nullable=False),
    Column("extra", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_current_timestamp()),
)

jobs_variants = Table(
    "jobs_variants", metadata,
    Column("job_variants_id", UUID(as_uuid=False), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("job_id", UUID(as_uuid=False), ForeignKey("jobs.job_id", ondelete="CASCADE"), nullable=False),
    Column("img_asset_id", UUID(as_uuid=False), ForeignKey("image_assets.image_asset_id")),
    Column("creation_order", Integer, nullable=False),
    Column("selected", Boolean, server_default=text("false")),
    Column("status", Text, server_default=text("'queued'::text")),
    Column("current_step", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_current_timestamp()),
    Column("updated_at", DateTime(timezone=True), server_default=_current_timestamp()),
    CheckConstraint(_status_check),
    Index("jobs_variants_status_idx", "status"),
    Index("jobs_variants_current_step_idx", "current_step"),
    Index("jobs_variants_job_id_status_idx", "job_id", "status"),
)

stage_graph = Table(
    "stage_graph", metadata,
    Column("stage", Text, primary_key=True),
    Column("level", Text, nullable=False),
    Column("after_step", Text, nullable=False),
    Column("device", Text, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("timeout_s", Integer, nullable=False),
    Column("position", Integer, nullable=False, unique=True),
    UniqueConstraint("level", "after_step", name="stage_graph_level_after_step_key"),
    CheckConstraint("level IN ('variant', 'job')"),
    CheckConstraint("device IN ('cpu', 'gpu')"),
    CheckConstraint("max_attempts >= 1"),
    CheckConstraint("timeout_s >= 1"),
)

stage_tasks = Table(
    "stage_tasks", metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("job_id", UUID(as_uuid=False), ForeignKey("jobs.job_id", ondelete="CASCADE"), nullable=False),
    Column("job_variants_id", UUID(as_uuid=False), ForeignKey("jobs_variants.job_variants_id", ondelete="CASCADE")),
    Column("stage", Text, ForeignKey("stage_graph.stage"), nullable=False),
    Column("status", Text, nullable=False, server_default=text("'queued'::text")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False),
    Column("expired_leases", Integer, nullable=False, server_default=text("0")),
    Column("run_after", DateTime(timezone=True), nullable=False, server_default=_now()),
    Column("lease_owner", Text),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("error_details", JSONB),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now()),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    # The attempts that ended other than done, oldest first (migration 0006); outbox_attempts()
    # adds the one that succeeded, which is the row itself.
    Column("attempt_log", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    CheckConstraint(_status_check),
    Index("stage_tasks_variant_stage_key", "job_variants_id", "stage", unique=True,
          postgresql_where=text("job_variants_id IS NOT NULL")),
    Index("stage_tasks_job_stage_key", "job_id", "stage", unique=True,
          postgresql_where=text("job_variants_id IS NULL")),
    Index("stage_tasks_claimable_idx", "stage", "run_after", "id", postgresql_where=text("status = 'queued'")),
    Index("stage_tasks_running_lease_idx", "lease_expires_at", postgresql_where=text("status = 'running'")),
    Index("stage_tasks_expired_queued_idx", "stage", "run_after",
          postgresql_where=text("status = 'queued' AND expired_leases > 0")),
    Index("stage_tasks_job_idx", "job_id"),
    Index("stage_tasks_failed_idx", "finished_at", postgresql_where=text("status = 'failed'")),
)

stage_results = Table(
    "stage_results", metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("task_id", BigInteger, ForeignKey("stage_tasks.id", ondelete="CASCADE"), nullable=False, unique=True),
    Column("job_id", UUID(as_uuid=False), ForeignKey("jobs.job_id", ondelete="CASCADE"), nullable=False),
    Column("job_variants_id", UUID(as_uuid=False), ForeignKey("jobs_variants.job_variants_id", ondelete="CASCADE")),
    Column("stage", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("result", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now()),
    Index("stage_results_variant_idx", "job_variants_id"),
    Index("stage_results_job_idx", "job_id"),
)

artifacts = Table(
    "artifacts", metadata,
    Column("key", Text, primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("byte_size", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now()),
    Index("artifacts_created_at_idx", "created_at"),
)

# Worker processes, written at start and at stop only (migration 0004): whether one is alive is
# read from pg_stat_activity (its connections' application_name is its id), not from this table.
workers = Table(
    "workers", metadata,
    Column("id", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("stages", ARRAY(Text), nullable=False),
    Column("lease_s", Float(53), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=_now()),
    Column("stopped_at", DateTime(timezone=True)),
    CheckConstraint("lease_s > 0"),
)
