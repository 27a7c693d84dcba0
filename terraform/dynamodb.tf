# The four tables. Names, keys, attribute types and indexes MUST equal the
# code's table definitions (`cargo run -q -p projector -- tables --json`);
# scripts/check_terraform.py compares the two in CI, and
# terraform/tables.expected.json is the checked-in copy of that definition.
#
# Keep each name as the literal "${var.table_prefix}-<suffix>" and the keys as
# literals: the checker reads them statically.
#
# All tables: on-demand capacity (no capacity planning, no throttling from
# under-provisioning), point-in-time recovery, server-side encryption with the
# module's KMS key (or the AWS-managed key), deletion protection.

# events: the only source of truth. Append-only: commands put one event per new
# (stream_id, version), conditioned on attribute_not_exists, so a lost race is a
# VersionConflict. The NEW_IMAGE stream feeds the projector Lambda.
resource "aws_dynamodb_table" "events" {
  name                        = "${var.table_prefix}-events"
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "stream_id"
  range_key                   = "version"
  stream_enabled              = true
  stream_view_type            = "NEW_IMAGE"
  deletion_protection_enabled = var.table_deletion_protection

  attribute {
    name = "stream_id"
    type = "S"
  }

  attribute {
    name = "version"
    type = "N"
  }

  attribute {
    name = "time_bucket"
    type = "S"
  }

  attribute {
    name = "occurred_key"
    type = "S"
  }

  # Global time-ordered reads (audit, replay by time range). With
  # VIEW_INDEX_SHARDS > 1, time_bucket is "<hour>#<k>" (ADR 0014).
  global_secondary_index {
    name            = "by-time"
    hash_key        = "time_bucket"
    range_key       = "occurred_key"
    projection_type = "ALL"
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = local.kms_key_arn
  }

  tags = {
    Name = "${var.table_prefix}-events"
    Role = "event-store"
  }
}

# pool: the view of every sandbox, written only by the projector.
resource "aws_dynamodb_table" "pool" {
  name                        = "${var.table_prefix}-pool"
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "sandbox_id"
  deletion_protection_enabled = var.table_deletion_protection

  attribute {
    name = "sandbox_id"
    type = "S"
  }

  attribute {
    name = "status"
    type = "S"
  }

  attribute {
    name = "pick"
    type = "N"
  }

  attribute {
    name = "name"
    type = "S"
  }

  attribute {
    name = "owner"
    type = "S"
  }

  attribute {
    name = "allocated_at"
    type = "N"
  }

  attribute {
    name = "due_shard"
    type = "S"
  }

  attribute {
    name = "due_key"
    type = "S"
  }

  # Allocation candidates: a random `pick` spreads concurrent allocations.
  global_secondary_index {
    name            = "by-status-pick"
    hash_key        = "status"
    range_key       = "pick"
    projection_type = "ALL"
  }

  # Admin listings by status, ordered by name.
  global_secondary_index {
    name            = "by-status-name"
    hash_key        = "status"
    range_key       = "name"
    projection_type = "ALL"
  }

  # A student's / track's allocations.
  global_secondary_index {
    name            = "by-owner"
    hash_key        = "owner"
    range_key       = "allocated_at"
    projection_type = "ALL"
  }

  # Expiry and cleanup query "due_shard = status#k and due_key < now" on each of
  # the VIEW_INDEX_SHARDS shards instead of scanning; the status is write-sharded
  # so no single partition takes every allocated row (ADR 0014).
  global_secondary_index {
    name            = "by-due"
    hash_key        = "due_shard"
    range_key       = "due_key"
    projection_type = "ALL"
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = local.kms_key_arn
  }

  tags = {
    Name = "${var.table_prefix}-pool"
    Role = "view"
  }
}

# stats: per-status counters sharded over STATS_SHARDS items so bursts of
# transitions never hit one partition key's write limit.
resource "aws_dynamodb_table" "stats" {
  name                        = "${var.table_prefix}-stats"
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "shard"
  deletion_protection_enabled = var.table_deletion_protection

  attribute {
    name = "shard"
    type = "S"
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = local.kms_key_arn
  }

  tags = {
    Name = "${var.table_prefix}-stats"
    Role = "view"
  }
}

# checkpoints: per stream shard, the last position the projector applied
# (written by the poller; in AWS the Lambda event source mapping keeps its own
# position, and the projector may record progress/lag here for /readyz).
resource "aws_dynamodb_table" "checkpoints" {
  name                        = "${var.table_prefix}-checkpoints"
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "shard_id"
  deletion_protection_enabled = var.table_deletion_protection

  attribute {
    name = "shard_id"
    type = "S"
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = local.kms_key_arn
  }

  tags = {
    Name = "${var.table_prefix}-checkpoints"
    Role = "projector-state"
  }
}
