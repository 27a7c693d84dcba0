# Personal data (docs/personal-data.md, ADR 0031): the subjects table that
# holds student ids and the salts of their pseudonyms outside the event log,
# the pseudonym key, and the switch from clear student ids.
#
# The subjects table is the only table whose items are deleted: an erasure
# deletes a student's record there, and IAM allows DeleteItem on it and on
# nothing else the API touches. Point-in-time recovery keeps it durable (losing
# it would make every running lab's student a stranger to their own sandbox),
# with a short recovery window so an erased record leaves the backups soon.

variable "student_ids" {
  description = "STUDENT_IDS: how student ids are stored, \"clear\" or \"pseudonymised\" (keyed pseudonyms; the id only in the erasable subjects table). Switch to pseudonymised with clear_id_fallback_until set while labs run (docs/personal-data.md)."
  type        = string
  default     = "clear"

  validation {
    condition     = contains(["clear", "pseudonymised"], var.student_ids)
    error_message = "student_ids must be \"clear\" or \"pseudonymised\"."
  }
}

variable "clear_id_fallback_until" {
  description = "CLEAR_ID_FALLBACK_UNTIL: after switching to pseudonymised student ids, until this RFC 3339 time requests also find the allocations made under clear ids (set it to the switch plus the longest lab, e.g. 48 h). Empty: no fallback."
  type        = string
  default     = ""
}

variable "subjects_recovery_days" {
  description = "Point-in-time recovery window of the subjects table, days (1-35): an erased student's record stays restorable this long."
  type        = number
  default     = 7

  validation {
    condition     = var.subjects_recovery_days >= 1 && var.subjects_recovery_days <= 35 && floor(var.subjects_recovery_days) == var.subjects_recovery_days
    error_message = "subjects_recovery_days must be a whole number from 1 to 35."
  }
}

resource "aws_dynamodb_table" "subjects" {
  name                        = "${var.table_prefix}-subjects"
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "subject_key"
  deletion_protection_enabled = var.table_deletion_protection

  attribute {
    name = "subject_key"
    type = "S"
  }

  point_in_time_recovery {
    enabled                 = true
    recovery_period_in_days = var.subjects_recovery_days
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = local.kms_key_arn
  }

  tags = {
    Name = "${var.table_prefix}-subjects"
    Role = "personal-data"
  }
}

resource "aws_secretsmanager_secret" "pseudonym_key" {
  #checkov:skip=CKV2_AWS_57:The pseudonym key never rotates: a new key would unlink every student from their pseudonym (docs/personal-data.md).
  name                    = "${var.name_prefix}/pseudonym-key"
  description             = "PSEUDONYM_KEY: derives student pseudonyms and the keys of their subject records"
  kms_key_id              = local.kms_key_arn
  recovery_window_in_days = 30
}

ephemeral "random_password" "pseudonym_key" {
  length  = 48
  special = false
}

resource "aws_secretsmanager_secret_version" "pseudonym_key" {
  secret_id        = aws_secretsmanager_secret.pseudonym_key.id
  secret_string_wo = ephemeral.random_password.pseudonym_key.result
  # Written once: the key must outlive every pseudonym it derived.
  secret_string_wo_version = 1
}

# The API keeps subject records: it reads and creates them, and deletes one per
# erasure. Nothing else may delete anywhere (the other tables' denials stand).
data "aws_iam_policy_document" "api_subjects" {
  statement {
    sid       = "SubjectRecords"
    actions   = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:DeleteItem", "dynamodb:ConditionCheckItem"]
    resources = [aws_dynamodb_table.subjects.arn]
  }
}

resource "aws_iam_role_policy" "api_subjects" {
  name   = "subjects"
  role   = aws_iam_role.api.id
  policy = data.aws_iam_policy_document.api_subjects.json
}

locals {
  personal_data_env = merge(
    { STUDENT_IDS = var.student_ids },
    var.clear_id_fallback_until == "" ? {} : { CLEAR_ID_FALLBACK_UNTIL = var.clear_id_fallback_until },
  )

  personal_data_secrets = {
    PSEUDONYM_KEY = aws_secretsmanager_secret.pseudonym_key.arn
  }
}
