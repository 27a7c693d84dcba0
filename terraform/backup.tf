# AWS Backup of the events table (docs/restore.md), off unless backup_enabled.
#
# Point-in-time recovery (dynamodb.tf) restores within this account and region
# for 35 days. A backup plan adds what PITR does not: daily recovery points kept
# longer (backup_retention_days), in a vault of their own, and — with
# backup_copy_vault_arn — a copy of every recovery point in a vault of another
# account and/or region, so a compromised account or a regional outage does not
# take the only copy with it. Only the events table is backed up: it is the
# source of truth; the view, stats and checkpoints tables are rebuilt from it
# (`projector rebuild`).
#
# The destination vault is not created here: it lives in the other account or
# region, with an access policy that lets this account copy into it
# (backup:CopyIntoBackupVault) and its own KMS key. docs/restore.md has the
# steps.

resource "aws_backup_vault" "events" {
  count = var.backup_enabled ? 1 : 0

  name        = "${var.name_prefix}-events"
  kms_key_arn = local.kms_key_arn
}

resource "aws_backup_plan" "events" {
  count = var.backup_enabled ? 1 : 0

  name = "${var.name_prefix}-events"

  rule {
    rule_name         = "daily"
    target_vault_name = aws_backup_vault.events[0].name
    schedule          = var.backup_schedule
    start_window      = 60
    completion_window = 360

    lifecycle {
      delete_after = var.backup_retention_days
    }

    dynamic "copy_action" {
      for_each = var.backup_copy_vault_arn == null ? [] : [var.backup_copy_vault_arn]
      content {
        destination_vault_arn = copy_action.value

        lifecycle {
          delete_after = var.backup_copy_retention_days
        }
      }
    }
  }
}

data "aws_iam_policy_document" "backup_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["backup.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "backup" {
  count = var.backup_enabled ? 1 : 0

  name               = "${var.name_prefix}-backup"
  description        = "AWS Backup: back up (and copy) the events table"
  assume_role_policy = data.aws_iam_policy_document.backup_assume.json
}

# AWS's managed policies for backup and restore; scoped by the selection below to
# the one table.
resource "aws_iam_role_policy_attachment" "backup" {
  count = var.backup_enabled ? 1 : 0

  role       = aws_iam_role.backup[0].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AWSBackupServiceRolePolicyForBackup"
}

resource "aws_iam_role_policy_attachment" "backup_restore" {
  count = var.backup_enabled ? 1 : 0

  role       = aws_iam_role.backup[0].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AWSBackupServiceRolePolicyForRestores"
}

resource "aws_backup_selection" "events" {
  count = var.backup_enabled ? 1 : 0

  name         = "${var.name_prefix}-events"
  plan_id      = aws_backup_plan.events[0].id
  iam_role_arn = aws_iam_role.backup[0].arn
  resources    = [aws_dynamodb_table.events.arn]
}
