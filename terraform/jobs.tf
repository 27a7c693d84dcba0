# Scheduled jobs: EventBridge Scheduler starts `jobs run <job>` as a one-off
# Fargate task (ECS RunTask). Why a scheduler and not a long-running worker, and
# why overlapping runs are safe: docs/adr/0004-jobs-scheduling.md.

resource "aws_scheduler_schedule_group" "jobs" {
  name = "${var.name_prefix}-jobs"
}

resource "aws_scheduler_schedule" "job" {
  #checkov:skip=CKV_AWS_297:The schedule's payload is only a job name and a command line (no data, no secrets); a customer-managed key on it would add a key-policy dependency for the Scheduler service without protecting anything.
  for_each = var.job_schedules

  name        = "${var.name_prefix}-${each.key}"
  group_name  = aws_scheduler_schedule_group.jobs.name
  description = "Runs `jobs run ${each.key}` as an ECS task"
  state       = var.jobs_enabled ? "ENABLED" : "DISABLED"

  schedule_expression          = each.value
  schedule_expression_timezone = var.job_schedule_timezone

  # Run on time; spreading runs is not needed at this scale.
  flexible_time_window {
    mode = "OFF"
  }

  target {
    arn      = aws_ecs_cluster.main.arn
    role_arn = aws_iam_role.scheduler.arn

    ecs_parameters {
      task_definition_arn     = aws_ecs_task_definition.jobs.arn
      launch_type             = "FARGATE"
      task_count              = 1
      enable_ecs_managed_tags = true
      propagate_tags          = "TASK_DEFINITION"
      tags = {
        Job = each.key
      }

      network_configuration {
        subnets          = aws_subnet.private[*].id
        security_groups  = [aws_security_group.tasks.id]
        assign_public_ip = false
      }
    }

    # For an ECS target the input is the RunTask `overrides` document.
    input = jsonencode({
      containerOverrides = [
        {
          name    = "jobs"
          command = ["/usr/local/bin/jobs", "run", each.key]
        }
      ]
    })

    # RunTask itself can fail (capacity, throttling): retry briefly, then park
    # the invocation in the DLQ, which has an alarm. A skipped run is harmless:
    # the next one does the same work.
    retry_policy {
      maximum_event_age_in_seconds = 600
      maximum_retry_attempts       = 3
    }

    dead_letter_config {
      arn = aws_sqs_queue.scheduler_dlq.arn
    }
  }
}

resource "aws_sqs_queue" "scheduler_dlq" {
  name                      = "${var.name_prefix}-scheduler-dlq"
  message_retention_seconds = 1209600

  kms_master_key_id                 = local.kms_key_arn
  kms_data_key_reuse_period_seconds = local.kms_enabled ? 300 : null
  sqs_managed_sse_enabled           = local.kms_enabled ? null : true
}

# Scheduler delivers dead letters with its role (aws_iam_role.scheduler has
# sqs:SendMessage); the queue policy only forbids plain-HTTP access.
resource "aws_sqs_queue_policy" "scheduler_dlq" {
  queue_url = aws_sqs_queue.scheduler_dlq.id
  policy    = data.aws_iam_policy_document.scheduler_dlq.json
}

data "aws_iam_policy_document" "scheduler_dlq" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["sqs:*"]
    resources = [aws_sqs_queue.scheduler_dlq.arn]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

# A job task that exits non-zero, or never starts (image pull, secrets,
# capacity), is reported to the alarm topic straight from ECS's own events,
# in addition to the log-based JobFailures metric (which needs the process to
# have run far enough to log).
resource "aws_cloudwatch_event_rule" "job_task_failed" {
  name        = "${var.name_prefix}-job-task-failed"
  description = "A jobs task stopped with a non-zero exit code or failed to start"

  event_pattern = jsonencode({
    source        = ["aws.ecs"]
    "detail-type" = ["ECS Task State Change"]
    detail = {
      clusterArn        = [aws_ecs_cluster.main.arn]
      lastStatus        = ["STOPPED"]
      taskDefinitionArn = [{ prefix = "arn:${local.partition}:ecs:${var.aws_region}:${local.account_id}:task-definition/${aws_ecs_task_definition.jobs.family}:" }]
      "$or" = [
        { containers = { exitCode = [{ "anything-but" = 0 }] } },
        { stopCode = ["TaskFailedToStart"] },
      ]
    }
  })
}

resource "aws_cloudwatch_event_target" "job_task_failed" {
  rule = aws_cloudwatch_event_rule.job_task_failed.name
  arn  = aws_sns_topic.alarms.arn

  input_transformer {
    input_paths = {
      group    = "$.detail.group"
      reason   = "$.detail.stoppedReason"
      stopCode = "$.detail.stopCode"
      task     = "$.detail.taskArn"
    }
    input_template = "\"Sandbox Broker job task <task> (<group>) stopped abnormally: <stopCode> - <reason>. See the jobs log group.\""
  }
}

# The API service's deployment circuit breaker rolled a deployment back.
resource "aws_cloudwatch_event_rule" "api_deployment_failed" {
  name        = "${var.name_prefix}-api-deployment-failed"
  description = "An API service deployment failed and was rolled back"

  event_pattern = jsonencode({
    source        = ["aws.ecs"]
    "detail-type" = ["ECS Deployment State Change"]
    resources     = [aws_ecs_service.api.id]
    detail = {
      eventName = ["SERVICE_DEPLOYMENT_FAILED"]
    }
  })
}

resource "aws_cloudwatch_event_target" "api_deployment_failed" {
  rule = aws_cloudwatch_event_rule.api_deployment_failed.name
  arn  = aws_sns_topic.alarms.arn
}

# The view heals itself on a schedule: `projector verify --repair` (ops task)
# replays the events, fixes every row the stream lost or a bug corrupted
# (docs/adr/0010-lag-proof-allocation.md), and logs "view repaired" with the
# number of rows it changed — counted by a metric filter with an alarm.
resource "aws_scheduler_schedule" "view_repair" {
  #checkov:skip=CKV_AWS_297:The payload is a command line only (no data, no secrets), as for the job schedules.
  count = var.view_repair_schedule == "" ? 0 : 1

  name        = "${var.name_prefix}-view-repair"
  group_name  = aws_scheduler_schedule_group.jobs.name
  description = "Runs `projector verify --repair` as an ECS task"
  state       = var.jobs_enabled ? "ENABLED" : "DISABLED"

  schedule_expression          = var.view_repair_schedule
  schedule_expression_timezone = var.job_schedule_timezone

  flexible_time_window {
    mode = "OFF"
  }

  target {
    arn      = aws_ecs_cluster.main.arn
    role_arn = aws_iam_role.scheduler.arn

    ecs_parameters {
      task_definition_arn     = aws_ecs_task_definition.ops.arn
      launch_type             = "FARGATE"
      task_count              = 1
      enable_ecs_managed_tags = true
      propagate_tags          = "TASK_DEFINITION"
      tags = {
        Job = "view-repair"
      }

      network_configuration {
        subnets          = aws_subnet.private[*].id
        security_groups  = [aws_security_group.tasks.id]
        assign_public_ip = false
      }
    }

    input = jsonencode({
      containerOverrides = [
        {
          name    = "ops"
          command = ["/usr/local/bin/projector", "verify", "--repair"]
        }
      ]
    })

    retry_policy {
      maximum_event_age_in_seconds = 600
      maximum_retry_attempts       = 3
    }

    dead_letter_config {
      arn = aws_sqs_queue.scheduler_dlq.arn
    }
  }
}
