# One customer-managed key (created unless kms_key_arn is given or
# create_kms_key = false) encrypting the tables and their stream, the secrets,
# the log groups, the alarm topic, the projector failure queue, ECR and the
# Lambda environment. Rotation is on.

resource "aws_kms_key" "main" {
  count = var.kms_key_arn == null && var.create_kms_key ? 1 : 0

  description             = "${var.name_prefix}: tables, secrets, logs, queues, alarm topic"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms[0].json
}

resource "aws_kms_alias" "main" {
  count = var.kms_key_arn == null && var.create_kms_key ? 1 : 0

  name          = "alias/${var.name_prefix}"
  target_key_id = aws_kms_key.main[0].key_id
}

data "aws_iam_policy_document" "kms" {
  count = var.kms_key_arn == null && var.create_kms_key ? 1 : 0

  # Standard account statement: lets IAM policies in this account grant use of
  # the key (every role in iam.tf gets only the actions it needs on this key).
  # A key policy's resource is always "*" (it means "this key").
  statement {
    sid       = "AccountAdministersKeyThroughIam"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  # CloudWatch Logs encrypts the log groups; scoped to this account's groups.
  statement {
    sid       = "CloudWatchLogsEncryptsLogGroups"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["logs.${var.aws_region}.amazonaws.com"]
    }

    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${var.aws_region}:${local.account_id}:log-group:*"]
    }
  }

  # CloudWatch alarms and EventBridge publish to the encrypted alarm topic.
  # Scoped by SNS's encryption context to that one topic (its ARN is built
  # from its name because the topic itself depends on this key).
  statement {
    sid       = "AlarmsAndEventsPublishToEncryptedTopic"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey*"]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com", "events.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "kms:EncryptionContext:aws:sns:topicArn"
      values   = ["arn:${local.partition}:sns:${var.aws_region}:${local.account_id}:${var.name_prefix}-alarms"]
    }
  }

  # EventBridge encrypts the optional events bus (eventbridge.tf) with this key;
  # scoped to that one bus (its ARN is built from its name, as above).
  dynamic "statement" {
    for_each = local.events_bus_create ? [1] : []
    content {
      sid       = "EventBridgeEncryptsEventsBus"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
      resources = ["*"]

      principals {
        type        = "Service"
        identifiers = ["events.amazonaws.com"]
      }

      condition {
        test     = "StringEquals"
        variable = "aws:SourceArn"
        values   = ["arn:${local.partition}:events:${var.aws_region}:${local.account_id}:event-bus/${var.name_prefix}-events"]
      }
    }
  }
}
