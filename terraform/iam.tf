# Least-privilege IAM, one role per component:
#
#   component            | events table                          | pool / stats (view)     | checkpoints
#   ---------------------+---------------------------------------+-------------------------+-------------
#   API task             | append (PutItem, ConditionCheckItem), | read; read repair       | read (lag);
#                        |                                       |                         | webhooks:* put
#                        | read one aggregate (GetItem, Query)   | (conditional Put + ADD) |
#   jobs task            | append, read                          | read; read repair       | -
#   projector Lambda     | stream read; GetItem/Query (catch-up) | WRITE (only writer)     | write
#   ops task (rebuild)   | full read incl. Scan                  | WRITE (it is the        | write
#                        |                                       | projector, run by hand) |
#
# TransactWriteItems needs no action of its own: IAM checks PutItem /
# ConditionCheckItem for each item in the transaction. Whether an append is
# conditional cannot be expressed in IAM; what IAM can enforce is that the
# events table is append-only: no role may UpdateItem, DeleteItem or
# BatchWriteItem on it, and that denial is explicit so a broader policy
# attached later cannot undo it. The API and the jobs may write the view only
# through read repair (conditional row put + stats ADD, docs/adr/0010); deletes,
# batch writes and checkpoint writes stay explicitly denied to them.

locals {
  events_arns    = [aws_dynamodb_table.events.arn, "${aws_dynamodb_table.events.arn}/index/*"]
  pool_arns      = [aws_dynamodb_table.pool.arn, "${aws_dynamodb_table.pool.arn}/index/*"]
  view_arns      = concat(local.pool_arns, [aws_dynamodb_table.stats.arn])
  all_table_arns = values(local.table_arns)

  # Actions that would rewrite history or bypass the version check.
  events_forbidden_actions = [
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:BatchWriteItem",
    "dynamodb:PartiQLUpdate",
    "dynamodb:PartiQLDelete",
    "dynamodb:PartiQLInsert",
    "dynamodb:DeleteTable",
    "dynamodb:UpdateTable",
    "dynamodb:RestoreTableFromBackup",
    "dynamodb:RestoreTableToPointInTime",
    "dynamodb:ImportTable",
  ]

  view_write_actions = [
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:BatchWriteItem",
    "dynamodb:PartiQLInsert",
    "dynamodb:PartiQLUpdate",
    "dynamodb:PartiQLDelete",
  ]

  # What read repair needs on the view (conditional row put, stats-shard ADD).
  view_repair_actions = ["dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:ConditionCheckItem"]

  # Use of the customer-managed key (tables, stream, secrets, queue, Lambda
  # environment). Empty when AWS-managed keys are used.
  kms_use_actions = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
}

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

# ---------------------------------------------------------------------------
# ECS execution roles (used by the ECS agent: pull the image, write logs,
# resolve the task's secrets). One per task family so each gets only its own
# secrets and log group.
# ---------------------------------------------------------------------------

locals {
  execution_roles = {
    api = {
      log_group = aws_cloudwatch_log_group.api.arn
      secrets   = values(local.api_secrets)
    }
    jobs = {
      log_group = aws_cloudwatch_log_group.jobs.arn
      secrets   = values(local.jobs_secrets)
    }
    ops = {
      log_group = aws_cloudwatch_log_group.ops.arn
      secrets   = []
    }
  }
}

resource "aws_iam_role" "execution" {
  for_each = local.execution_roles

  name               = "${var.name_prefix}-${each.key}-execution"
  description        = "ECS agent role for the ${each.key} tasks: image pull, logs, secrets"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "execution" {
  for_each = local.execution_roles

  # GetAuthorizationToken has no resource-level permissions in IAM.
  statement {
    sid       = "EcrLogin"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }

  statement {
    sid       = "PullImage"
    actions   = ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]
    resources = [aws_ecr_repository.app.arn]
  }

  statement {
    sid       = "WriteOwnLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${each.value.log_group}:*"]
  }

  dynamic "statement" {
    for_each = length(each.value.secrets) > 0 ? [1] : []
    content {
      sid       = "ReadOwnSecrets"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = each.value.secrets
    }
  }

  dynamic "statement" {
    for_each = local.kms_enabled ? [1] : []
    content {
      sid       = "DecryptWithDeploymentKey"
      actions   = ["kms:Decrypt", "kms:DescribeKey"]
      resources = [local.kms_key_arn]
    }
  }
}

resource "aws_iam_role_policy" "execution" {
  for_each = local.execution_roles

  name   = "execution"
  role   = aws_iam_role.execution[each.key].id
  policy = data.aws_iam_policy_document.execution[each.key].json
}

# ---------------------------------------------------------------------------
# API task role
# ---------------------------------------------------------------------------

resource "aws_iam_role" "api" {
  name               = "${var.name_prefix}-api"
  description        = "command-api: append events, read events and the view"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "api" {
  statement {
    sid       = "AppendEvents"
    actions   = ["dynamodb:PutItem", "dynamodb:ConditionCheckItem"]
    resources = [aws_dynamodb_table.events.arn]
  }

  statement {
    sid       = "ReadEvents"
    actions   = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"]
    resources = local.events_arns
  }

  statement {
    sid       = "ReadView"
    actions   = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query", "dynamodb:Scan"]
    resources = local.view_arns
  }

  statement {
    sid       = "ReadProjectorProgress"
    actions   = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Scan"]
    resources = [aws_dynamodb_table.checkpoints.arn]
  }

  statement {
    sid       = "DescribeTables"
    actions   = ["dynamodb:DescribeTable"]
    resources = local.all_table_arns
  }

  statement {
    sid       = "EventsAreAppendOnly"
    effect    = "Deny"
    actions   = local.events_forbidden_actions
    resources = local.events_arns
  }

  # Read repair (docs/adr/0010): a row found behind its stream is re-projected through the
  # projector's version-conditioned apply — a conditional Put of the row plus an ADD on its
  # stats shard, in one transaction. Nothing else: no deletes, no checkpoints.
  statement {
    sid       = "ReadRepairOfTheView"
    actions   = local.view_repair_actions
    resources = local.view_arns
  }

  statement {
    sid       = "OnlyTheProjectorRewritesTheView"
    effect    = "Deny"
    actions   = setsubtract(local.view_write_actions, local.view_repair_actions)
    resources = local.view_arns
  }

  # The webhook dispatcher (docs/adr/0018) keeps each subscriber's delivery state under the
  # checkpoint key `webhooks:<name>` and its dispatch lease (a conditional PutItem) under
  # `webhooks:<name>:lease`; every other checkpoint stays the projector's.
  statement {
    sid       = "OnlyTheProjectorMovesCheckpoints"
    effect    = "Deny"
    actions   = local.view_write_actions
    resources = [aws_dynamodb_table.checkpoints.arn]

    condition {
      test     = "ForAnyValue:StringNotLike"
      variable = "dynamodb:LeadingKeys"
      values   = ["webhooks:*"]
    }
  }

  statement {
    sid       = "WebhookDeliveryState"
    actions   = ["dynamodb:PutItem"]
    resources = [aws_dynamodb_table.checkpoints.arn]

    condition {
      test     = "ForAllValues:StringLike"
      variable = "dynamodb:LeadingKeys"
      values   = ["webhooks:*"]
    }
  }

  dynamic "statement" {
    for_each = local.kms_enabled ? [1] : []
    content {
      sid       = "UseDeploymentKey"
      actions   = local.kms_use_actions
      resources = [local.kms_key_arn]
    }
  }
}

resource "aws_iam_role_policy" "api" {
  name   = "api"
  role   = aws_iam_role.api.id
  policy = data.aws_iam_policy_document.api.json
}

# ---------------------------------------------------------------------------
# Jobs task role
# ---------------------------------------------------------------------------

resource "aws_iam_role" "jobs" {
  name               = "${var.name_prefix}-jobs"
  description        = "jobs run <job>: append events, read events and the view"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "jobs" {
  statement {
    sid       = "AppendEvents"
    actions   = ["dynamodb:PutItem", "dynamodb:ConditionCheckItem"]
    resources = [aws_dynamodb_table.events.arn]
  }

  statement {
    sid       = "ReadEvents"
    actions   = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"]
    resources = local.events_arns
  }

  statement {
    sid       = "ReadView"
    actions   = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query", "dynamodb:Scan"]
    resources = local.view_arns
  }

  statement {
    sid       = "DescribeTables"
    actions   = ["dynamodb:DescribeTable"]
    resources = local.all_table_arns
  }

  statement {
    sid       = "EventsAreAppendOnly"
    effect    = "Deny"
    actions   = local.events_forbidden_actions
    resources = local.events_arns
  }

  # Read repair (docs/adr/0010): a row found behind its stream is re-projected through the
  # projector's version-conditioned apply — a conditional Put of the row plus an ADD on its
  # stats shard, in one transaction. Nothing else: no deletes, no checkpoints.
  statement {
    sid       = "ReadRepairOfTheView"
    actions   = local.view_repair_actions
    resources = local.view_arns
  }

  statement {
    sid       = "OnlyTheProjectorRewritesTheView"
    effect    = "Deny"
    actions   = setsubtract(local.view_write_actions, local.view_repair_actions)
    resources = local.view_arns
  }

  statement {
    sid       = "OnlyTheProjectorMovesCheckpoints"
    effect    = "Deny"
    actions   = local.view_write_actions
    resources = [aws_dynamodb_table.checkpoints.arn]
  }

  dynamic "statement" {
    for_each = local.kms_enabled ? [1] : []
    content {
      sid       = "UseDeploymentKey"
      actions   = local.kms_use_actions
      resources = [local.kms_key_arn]
    }
  }
}

resource "aws_iam_role_policy" "jobs" {
  name   = "jobs"
  role   = aws_iam_role.jobs.id
  policy = data.aws_iam_policy_document.jobs.json
}

# ---------------------------------------------------------------------------
# Projector Lambda role: the only writer of the view
# ---------------------------------------------------------------------------

data "aws_iam_policy_document" "lambda_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "projector" {
  name               = "${var.name_prefix}-projector"
  description        = "projector-lambda: read the events stream, write the pool view, stats and checkpoints"
  assume_role_policy = data.aws_iam_policy_document.lambda_assume.json
}

# Shared by the Lambda role and the ops role (which runs the same projector).
data "aws_iam_policy_document" "projector_writes_view" {
  statement {
    sid = "WriteView"
    actions = [
      "dynamodb:GetItem",
      "dynamodb:BatchGetItem",
      "dynamodb:Query",
      "dynamodb:PutItem",
      "dynamodb:UpdateItem",
      "dynamodb:DeleteItem",
      "dynamodb:ConditionCheckItem",
    ]
    resources = concat(local.view_arns, [aws_dynamodb_table.checkpoints.arn])
  }

  # Catch-up reads of one aggregate when the view is behind.
  statement {
    sid       = "ReadEvents"
    actions   = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"]
    resources = local.events_arns
  }

  statement {
    sid       = "DescribeTables"
    actions   = ["dynamodb:DescribeTable"]
    resources = local.all_table_arns
  }

  statement {
    sid       = "EventsAreAppendOnly"
    effect    = "Deny"
    actions   = concat(local.events_forbidden_actions, ["dynamodb:PutItem"])
    resources = local.events_arns
  }

  dynamic "statement" {
    for_each = local.kms_enabled ? [1] : []
    content {
      sid       = "UseDeploymentKey"
      actions   = local.kms_use_actions
      resources = [local.kms_key_arn]
    }
  }
}

data "aws_iam_policy_document" "projector" {
  source_policy_documents = [data.aws_iam_policy_document.projector_writes_view.json]

  # What the event source mapping needs to read the stream.
  statement {
    sid       = "ReadEventsStream"
    actions   = ["dynamodb:DescribeStream", "dynamodb:GetRecords", "dynamodb:GetShardIterator"]
    resources = [aws_dynamodb_table.events.stream_arn]
  }

  # ListStreams has no resource-level permissions in IAM.
  statement {
    sid       = "ListStreams"
    actions   = ["dynamodb:ListStreams"]
    resources = ["*"]
  }

  statement {
    sid       = "SendFailedBatchesToQueue"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.projector_failures.arn]
  }

  statement {
    sid       = "WriteOwnLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.projector.arn}:*"]
  }
}

resource "aws_iam_role_policy" "projector" {
  name   = "projector"
  role   = aws_iam_role.projector.id
  policy = data.aws_iam_policy_document.projector.json
}

# ENI management for a function attached to the VPC (AWS managed policy; its
# EC2 network-interface actions have no resource-level scoping).
resource "aws_iam_role_policy_attachment" "projector_vpc" {
  role       = aws_iam_role.projector.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"
}

# ---------------------------------------------------------------------------
# Ops task role: `projector verify|rebuild` run by an operator as a one-off
# ECS task. It is the projector, so it may write the view; rebuild also needs to
# scan the whole event log and clear the view.
# ---------------------------------------------------------------------------

resource "aws_iam_role" "ops" {
  name               = "${var.name_prefix}-ops"
  description        = "projector verify|rebuild: scan events, rewrite the view"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "ops" {
  source_policy_documents = [data.aws_iam_policy_document.projector_writes_view.json]

  statement {
    sid       = "ScanEvents"
    actions   = ["dynamodb:Scan"]
    resources = local.events_arns
  }

  statement {
    sid       = "ScanAndClearView"
    actions   = ["dynamodb:Scan", "dynamodb:BatchWriteItem"]
    resources = concat(local.view_arns, [aws_dynamodb_table.checkpoints.arn])
  }
}

resource "aws_iam_role_policy" "ops" {
  name   = "ops"
  role   = aws_iam_role.ops.id
  policy = data.aws_iam_policy_document.ops.json
}

# ---------------------------------------------------------------------------
# EventBridge Scheduler role: start the jobs task definition, nothing else.
# ---------------------------------------------------------------------------

data "aws_iam_policy_document" "scheduler_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["scheduler.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "scheduler" {
  name               = "${var.name_prefix}-scheduler"
  description        = "EventBridge Scheduler: ecs:RunTask of the jobs task definition"
  assume_role_policy = data.aws_iam_policy_document.scheduler_assume.json
}

data "aws_iam_policy_document" "scheduler" {
  statement {
    sid     = "RunJobsTask"
    actions = ["ecs:RunTask"]
    resources = [
      "arn:${local.partition}:ecs:${var.aws_region}:${local.account_id}:task-definition/${aws_ecs_task_definition.jobs.family}:*",
      "arn:${local.partition}:ecs:${var.aws_region}:${local.account_id}:task-definition/${aws_ecs_task_definition.ops.family}:*",
    ]

    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [aws_ecs_cluster.main.arn]
    }
  }

  # RunTask with tags (managed tags, the Job tag) needs TagResource on the task.
  statement {
    sid       = "TagJobsTask"
    actions   = ["ecs:TagResource"]
    resources = ["arn:${local.partition}:ecs:${var.aws_region}:${local.account_id}:task/${aws_ecs_cluster.main.name}/*"]

    condition {
      test     = "StringEquals"
      variable = "ecs:CreateAction"
      values   = ["RunTask"]
    }
  }

  statement {
    sid       = "PassJobsRoles"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.jobs.arn, aws_iam_role.execution["jobs"].arn, aws_iam_role.ops.arn, aws_iam_role.execution["ops"].arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ecs-tasks.amazonaws.com"]
    }
  }

  statement {
    sid       = "DeadLetter"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.scheduler_dlq.arn]
  }

  # The dead-letter queue is encrypted with the deployment key.
  dynamic "statement" {
    for_each = local.kms_enabled ? [1] : []
    content {
      sid       = "EncryptDeadLetters"
      actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
      resources = [local.kms_key_arn]
    }
  }
}

resource "aws_iam_role_policy" "scheduler" {
  name   = "scheduler"
  role   = aws_iam_role.scheduler.id
  policy = data.aws_iam_policy_document.scheduler.json
}

# ---------------------------------------------------------------------------
# VPC flow logs delivery role
# ---------------------------------------------------------------------------

data "aws_iam_policy_document" "flow_logs_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "flow_logs" {
  name               = "${var.name_prefix}-flow-logs"
  description        = "VPC flow logs delivery to CloudWatch Logs"
  assume_role_policy = data.aws_iam_policy_document.flow_logs_assume.json
}

data "aws_iam_policy_document" "flow_logs" {
  statement {
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = ["${aws_cloudwatch_log_group.flow_logs.arn}:*"]
  }
}

resource "aws_iam_role_policy" "flow_logs" {
  name   = "flow-logs"
  role   = aws_iam_role.flow_logs.id
  policy = data.aws_iam_policy_document.flow_logs.json
}
