# Operations as code: metrics from the JSON logs, alarms, a notification topic,
# saved Logs Insights queries and a dashboard.
#
# Log lines the filters rely on (tracing-subscriber JSON, fields flattened):
#   access log  {"target":"access","message":"request","method":..,"route":"/v1/allocate",
#                "status":409,"code":"NO_SANDBOXES_AVAILABLE","latency_ms":12,"request_id":..}
#   job run     {"target":"job","message":"job finished","job":"cleanup",
#                "outcome":"success"|"error","duration_ms":..}
#   CSP call    {"target":"csp","message":"csp call","op":"delete","status":500,"outcome":"error"}
#   projector   {"target":"projector","message":"applied","lag_ms":..}
# Rate-limit hits are access lines with status 429 and code RATE_LIMIT_EXCEEDED.

# ---------------------------------------------------------------------------
# Notifications
# ---------------------------------------------------------------------------

resource "aws_sns_topic" "alarms" {
  name              = "${var.name_prefix}-alarms"
  display_name      = "Sandbox Broker alarms"
  kms_master_key_id = local.kms_key_arn
}

resource "aws_sns_topic_policy" "alarms" {
  arn    = aws_sns_topic.alarms.arn
  policy = data.aws_iam_policy_document.alarms_topic.json
}

data "aws_iam_policy_document" "alarms_topic" {
  # Only this account's alarms and this deployment's EventBridge rules.
  statement {
    sid       = "CloudWatchAlarmsPublish"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms.arn]

    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:cloudwatch:${var.aws_region}:${local.account_id}:alarm:*"]
    }
  }

  statement {
    sid       = "EcsEventRulesPublish"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms.arn]

    principals {
      type        = "Service"
      identifiers = ["events.amazonaws.com"]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:events:${var.aws_region}:${local.account_id}:rule/${var.name_prefix}-*"]
    }
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["sns:Publish", "sns:Subscribe"]
    resources = [aws_sns_topic.alarms.arn]

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

resource "aws_sns_topic_subscription" "alarms" {
  count = var.alarm_notification_endpoint == null ? 0 : 1

  topic_arn = aws_sns_topic.alarms.arn
  protocol  = var.alarm_notification_protocol
  endpoint  = var.alarm_notification_endpoint
}

# ---------------------------------------------------------------------------
# Metric filters
# ---------------------------------------------------------------------------

locals {
  # Counting filters emit 0 when a line does not match (default_value), so the
  # alarms see a real zero instead of missing data.
  counter_filters = {
    api-requests = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"access\" }"
      metric    = "ApiRequests"
    }
    api-errors = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"access\" && $.status >= 500 }"
      metric    = "ApiErrors"
    }
    no-sandboxes-available = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"access\" && $.status = 409 && $.code = \"NO_SANDBOXES_AVAILABLE\" }"
      metric    = "NoSandboxesAvailable"
    }
    allocations = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"access\" && $.route = \"/v1/allocate\" && ($.status = 200 || $.status = 201) }"
      metric    = "Allocations"
    }
    slow-requests = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"access\" && $.latency_ms > ${var.slow_request_threshold_ms} }"
      metric    = "SlowRequests"
    }
    # One line per low prefix group per POOL_WATCH_INTERVAL_SEC while it stays
    # below POOL_LOW_WATER (docs/adr/0018).
    pool-low-water = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"pool\" && $.message = \"pool below low water\" }"
      metric    = "PoolLowWater"
    }
    # Drains and quotas (docs/adr/0017): refused allocations by reason, and one
    # `pool drained` line per drain per POOL_WATCH_INTERVAL_SEC while it is in force.
    allocations-refused-maintenance = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"access\" && $.status = 503 && $.code = \"MAINTENANCE\" }"
      metric    = "AllocationsRefusedMaintenance"
    }
    quota-exceeded = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"access\" && $.status = 429 && $.code = \"QUOTA_EXCEEDED\" }"
      metric    = "QuotaExceeded"
    }
    pool-drained = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"pool\" && $.message = \"pool drained\" }"
      metric    = "PoolDrained"
    }
    rate-limit-hits = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"access\" && $.status = 429 && $.code = \"RATE_LIMIT_EXCEEDED\" }"
      metric    = "RateLimitHits"
    }
    api-csp-calls = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"csp\" }"
      metric    = "CspCalls"
    }
    api-csp-errors = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"csp\" && $.outcome = \"error\" }"
      metric    = "CspErrors"
    }
    jobs-csp-calls = {
      log_group = aws_cloudwatch_log_group.jobs.name
      pattern   = "{ $.target = \"csp\" }"
      metric    = "CspCalls"
    }
    jobs-csp-errors = {
      log_group = aws_cloudwatch_log_group.jobs.name
      pattern   = "{ $.target = \"csp\" && $.outcome = \"error\" }"
      metric    = "CspErrors"
    }
    job-failures = {
      log_group = aws_cloudwatch_log_group.jobs.name
      pattern   = "{ $.target = \"job\" && $.outcome = \"error\" }"
      metric    = "JobFailures"
    }
    projector-errors = {
      log_group = aws_cloudwatch_log_group.projector.name
      pattern   = "{ $.target = \"projector\" && $.level = \"ERROR\" }"
      metric    = "ProjectorErrors"
    }
    # Reservations (docs/reservations.md): a shortfall found by the reservation
    # job before a window opens, and a prefix group that runs dry within
    # CAPACITY_LOW_WATER_HOURS at the current allocation rate.
    reservation-shortfall = {
      log_group = aws_cloudwatch_log_group.jobs.name
      pattern   = "{ $.target = \"reservations\" && $.message = \"reservation is short of sandboxes\" }"
      metric    = "ReservationShortfall"
    }
    capacity-runs-dry = {
      log_group = aws_cloudwatch_log_group.api.name
      pattern   = "{ $.target = \"pool\" && $.message = \"pool runs dry soon\" }"
      metric    = "CapacityRunsDry"
    }
  }
}

resource "aws_cloudwatch_log_metric_filter" "counter" {
  for_each = local.counter_filters

  name           = "${var.name_prefix}-${each.key}"
  log_group_name = each.value.log_group
  pattern        = each.value.pattern

  metric_transformation {
    name          = each.value.metric
    namespace     = var.metrics_namespace
    value         = "1"
    default_value = "0"
    unit          = "Count"
  }
}

# Value filters: the metric is a number taken from the line.
resource "aws_cloudwatch_log_metric_filter" "request_latency" {
  name           = "${var.name_prefix}-request-latency"
  log_group_name = aws_cloudwatch_log_group.api.name
  pattern        = "{ $.target = \"access\" && $.latency_ms >= 0 }"

  metric_transformation {
    name      = "RequestLatencyMs"
    namespace = var.metrics_namespace
    value     = "$.latency_ms"
    unit      = "Milliseconds"
  }
}

resource "aws_cloudwatch_log_metric_filter" "projector_lag" {
  name           = "${var.name_prefix}-projector-lag"
  log_group_name = aws_cloudwatch_log_group.projector.name
  pattern        = "{ $.target = \"projector\" && $.message = \"applied\" && $.lag_ms >= 0 }"

  metric_transformation {
    name      = "ProjectorLagMs"
    namespace = var.metrics_namespace
    value     = "$.lag_ms"
    unit      = "Milliseconds"
  }
}

# One data point per finished job run, by job and outcome (dimensions cannot be
# combined with a default value, hence a separate filter from JobFailures).
resource "aws_cloudwatch_log_metric_filter" "job_runs" {
  name           = "${var.name_prefix}-job-runs"
  log_group_name = aws_cloudwatch_log_group.jobs.name
  pattern        = "{ $.target = \"job\" && $.message = \"job finished\" }"

  metric_transformation {
    name      = "JobRuns"
    namespace = var.metrics_namespace
    value     = "1"
    unit      = "Count"
    dimensions = {
      Job     = "$.job"
      Outcome = "$.outcome"
    }
  }
}

# ---------------------------------------------------------------------------
# Alarms
# ---------------------------------------------------------------------------

locals {
  alarm_actions = [aws_sns_topic.alarms.arn]

  log_alarms = {
    pool-low-water = {
      description = "A name prefix group has fewer available sandboxes than its POOL_LOW_WATER threshold: see GET /v1/admin/stats (low_water) and add accounts to that lab's pool before it runs dry."
      metric      = "PoolLowWater"
      period      = 300
      threshold   = 1
    }
    api-5xx = {
      description = "API answered 5xx: see the all-errors saved query."
      metric      = "ApiErrors"
      period      = 300
      threshold   = var.alarm_thresholds.api_5xx
    }
    no-sandboxes-available = {
      description = "Allocations fail with NO_SANDBOXES_AVAILABLE: students cannot start labs. Check the pool (sync job, stale/quarantined sandboxes) and add accounts."
      metric      = "NoSandboxesAvailable"
      period      = 300
      threshold   = var.alarm_thresholds.no_sandboxes
    }
    slow-requests = {
      description = "Many requests slower than ${var.slow_request_threshold_ms} ms: see the slow-requests saved query."
      metric      = "SlowRequests"
      period      = 300
      threshold   = var.alarm_thresholds.slow_requests
    }
    rate-limit-hits = {
      description = "Callers are being rate limited (429 RATE_LIMIT_EXCEEDED): a misbehaving track script or a flood."
      metric      = "RateLimitHits"
      period      = 300
      threshold   = var.alarm_thresholds.rate_limit_hits
    }
    quota-exceeded = {
      description = "Allocations refused with 429 QUOTA_EXCEEDED: a track holds its quota of concurrent allocations (GET /v1/admin/pool shows usage). Raise TRACK_QUOTAS for it or find the track that leaks allocations."
      metric      = "QuotaExceeded"
      period      = 300
      threshold   = var.alarm_thresholds.quota_exceeded
    }
    csp-errors = {
      description = "CSP API calls are failing: see the csp-calls saved query. Cleanup defers work while the circuit breaker is open."
      metric      = "CspErrors"
      period      = 900
      threshold   = var.alarm_thresholds.csp_errors
    }
    job-failures = {
      description = "A scheduled job run finished with outcome=error: see the job-runs saved query."
      metric      = "JobFailures"
      period      = 900
      threshold   = var.alarm_thresholds.job_failures
    }
    reservation-shortfall = {
      description = "A reservation holds fewer earmarked sandboxes than it reserved (brokerctl reservations list shows the shortfall): run a sync or add accounts before its window opens, or reduce it."
      metric      = "ReservationShortfall"
      period      = 900
      threshold   = 1
    }
    capacity-runs-dry = {
      description = "A name prefix group's open pool runs dry within CAPACITY_LOW_WATER_HOURS at the current allocation rate (GET /v1/capacity shows when): add accounts and run a sync."
      metric      = "CapacityRunsDry"
      period      = 300
      threshold   = 1
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "log" {
  for_each = local.log_alarms

  alarm_name          = "${var.name_prefix}-${each.key}"
  alarm_description   = each.value.description
  namespace           = var.metrics_namespace
  metric_name         = each.value.metric
  statistic           = "Sum"
  period              = each.value.period
  evaluation_periods  = 1
  threshold           = each.value.threshold
  comparison_operator = "GreaterThanOrEqualToThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

# A job that has stopped succeeding (never scheduled, failing before it can
# log, or always erroring) is as bad as one that fails loudly.
resource "aws_cloudwatch_metric_alarm" "job_not_succeeding" {
  for_each = var.jobs_enabled ? var.job_schedules : {}

  alarm_name          = "${var.name_prefix}-job-${each.key}-not-succeeding"
  alarm_description   = "No successful `jobs run ${each.key}` for ${var.job_success_alarm_hours} h (schedule ${each.value})."
  namespace           = var.metrics_namespace
  metric_name         = "JobRuns"
  dimensions          = { Job = each.key, Outcome = "success" }
  statistic           = "Sum"
  period              = 3600
  evaluation_periods  = var.job_success_alarm_hours
  threshold           = 1
  comparison_operator = "LessThanThreshold"
  treat_missing_data  = "breaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

# A drain is maintenance: refusals during it are expected, but a drain still in
# force hours later was most likely forgotten. Every period of the window must
# have seen a `pool drained` line.
resource "aws_cloudwatch_metric_alarm" "pool_drained_long" {
  alarm_name          = "${var.name_prefix}-pool-drained-long"
  alarm_description   = "Allocation has been drained (POST /v1/admin/pool/drain) for ${var.drain_alarm_hours} h: students get 503 MAINTENANCE. GET /v1/admin/pool shows the drains; POST /v1/admin/pool/resume ends one."
  namespace           = var.metrics_namespace
  metric_name         = "PoolDrained"
  statistic           = "Sum"
  period              = 3600
  evaluation_periods  = var.drain_alarm_hours
  datapoints_to_alarm = var.drain_alarm_hours
  threshold           = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "projector_lag" {
  alarm_name          = "${var.name_prefix}-projector-lag"
  alarm_description   = "The pool view lags the events by more than ${var.alarm_thresholds.projector_lag_ms} ms (projector's own measurement). Allocation candidates and listings are stale; /readyz reports it too."
  namespace           = var.metrics_namespace
  metric_name         = "ProjectorLagMs"
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  threshold           = var.alarm_thresholds.projector_lag_ms
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

# Rows the scheduled `projector verify --repair` had to fix: each one is a
# record the stream source lost or a row something corrupted.
resource "aws_cloudwatch_log_metric_filter" "view_rows_repaired" {
  name           = "${var.name_prefix}-view-rows-repaired"
  log_group_name = aws_cloudwatch_log_group.ops.name
  pattern        = "{ $.target = \"projector\" && $.message = \"view repaired\" && $.rows_repaired >= 0 }"

  metric_transformation {
    name      = "ViewRowsRepaired"
    namespace = var.metrics_namespace
    value     = "$.rows_repaired"
    unit      = "Count"
  }
}

resource "aws_cloudwatch_metric_alarm" "view_rows_repaired" {
  alarm_name          = "${var.name_prefix}-view-rows-repaired"
  alarm_description   = "The scheduled verify --repair fixed view rows: the projector lost or mis-applied records. Read the ops log for the rows (DRIFT lines) and the projector's errors/DLQ."
  namespace           = var.metrics_namespace
  metric_name         = "ViewRowsRepaired"
  statistic           = "Sum"
  period              = 3600
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "projector_iterator_age" {
  alarm_name          = "${var.name_prefix}-projector-iterator-age"
  alarm_description   = "The projector is falling behind the events stream (IteratorAge). If it approaches 24 h, records expire from the stream."
  namespace           = "AWS/Lambda"
  metric_name         = "IteratorAge"
  dimensions          = { FunctionName = aws_lambda_function.projector.function_name }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  threshold           = var.alarm_thresholds.iterator_age_ms
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "projector_errors" {
  alarm_name          = "${var.name_prefix}-projector-errors"
  alarm_description   = "Projector invocations are failing (retried; after the retry budget records go to the failure queue)."
  namespace           = "AWS/Lambda"
  metric_name         = "Errors"
  dimensions          = { FunctionName = aws_lambda_function.projector.function_name }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  threshold           = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "projector_failure_queue" {
  alarm_name          = "${var.name_prefix}-projector-failure-queue"
  alarm_description   = "The projector gave up on stream records: the view is missing events until they are replayed or the view is rebuilt (docs/operations.md, Projector failures)."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.projector_failures.name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "scheduler_dlq" {
  alarm_name          = "${var.name_prefix}-scheduler-dlq"
  alarm_description   = "EventBridge Scheduler could not start a job task (see the message in the scheduler DLQ)."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.scheduler_dlq.name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "api_no_healthy_targets" {
  alarm_name          = "${var.name_prefix}-api-no-healthy-targets"
  alarm_description   = "The ALB has no healthy API task: the broker is down."
  namespace           = "AWS/ApplicationELB"
  metric_name         = "HealthyHostCount"
  dimensions          = { LoadBalancer = aws_lb.api.arn_suffix, TargetGroup = aws_lb_target_group.api.arn_suffix }
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 2
  threshold           = 1
  comparison_operator = "LessThanThreshold"
  treat_missing_data  = "breaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "alb_5xx" {
  alarm_name          = "${var.name_prefix}-alb-5xx"
  alarm_description   = "The ALB itself answers 5xx (no target, target timeouts, resets): requests that never reached the API's access log."
  namespace           = "AWS/ApplicationELB"
  metric_name         = "HTTPCode_ELB_5XX_Count"
  dimensions          = { LoadBalancer = aws_lb.api.arn_suffix }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  threshold           = var.alarm_thresholds.api_5xx
  comparison_operator = "GreaterThanOrEqualToThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

# ---------------------------------------------------------------------------
# Saved Logs Insights queries (CloudWatch console > Logs Insights > Queries)
# ---------------------------------------------------------------------------

locals {
  app_log_groups = [
    aws_cloudwatch_log_group.api.name,
    aws_cloudwatch_log_group.jobs.name,
    aws_cloudwatch_log_group.projector.name,
    aws_cloudwatch_log_group.ops.name,
  ]
}

resource "aws_cloudwatch_query_definition" "all_errors" {
  name            = "${var.name_prefix}/all-errors"
  log_group_names = local.app_log_groups
  query_string    = <<-EOT
    fields @timestamp, @logStream, level, target, message, status, code, route, job, op, request_id
    | filter level = "ERROR" or status >= 500 or outcome = "error"
    | sort @timestamp desc
    | limit 200
  EOT
}

resource "aws_cloudwatch_query_definition" "allocation_failures" {
  name            = "${var.name_prefix}/allocation-failures"
  log_group_names = [aws_cloudwatch_log_group.api.name]
  query_string    = <<-EOT
    fields @timestamp, status, code, latency_ms, request_id
    | filter target = "access" and route = "/v1/allocate" and status >= 400
    | sort @timestamp desc
    | limit 200
  EOT
}

resource "aws_cloudwatch_query_definition" "allocation_failures_by_code" {
  name            = "${var.name_prefix}/allocation-failures-by-code"
  log_group_names = [aws_cloudwatch_log_group.api.name]
  query_string    = <<-EOT
    filter target = "access" and route = "/v1/allocate" and status >= 400
    | stats count(*) as failures by code, status, bin(5m)
    | sort failures desc
  EOT
}

resource "aws_cloudwatch_query_definition" "slow_requests" {
  name            = "${var.name_prefix}/slow-requests"
  log_group_names = [aws_cloudwatch_log_group.api.name]
  query_string    = <<-EOT
    fields @timestamp, method, route, status, code, latency_ms, request_id
    | filter target = "access" and latency_ms > ${var.slow_request_threshold_ms}
    | sort latency_ms desc
    | limit 200
  EOT
}

resource "aws_cloudwatch_query_definition" "latency_by_route" {
  name            = "${var.name_prefix}/latency-by-route"
  log_group_names = [aws_cloudwatch_log_group.api.name]
  query_string    = <<-EOT
    filter target = "access"
    | stats count(*) as requests, pct(latency_ms, 50) as p50, pct(latency_ms, 99) as p99, max(latency_ms) as max by route
    | sort p99 desc
  EOT
}

resource "aws_cloudwatch_query_definition" "job_runs" {
  name            = "${var.name_prefix}/job-runs"
  log_group_names = [aws_cloudwatch_log_group.jobs.name]
  query_string    = <<-EOT
    fields @timestamp, job, outcome, duration_ms, @logStream
    | filter target = "job" and message = "job finished"
    | sort @timestamp desc
    | limit 200
  EOT
}

resource "aws_cloudwatch_query_definition" "csp_calls" {
  name            = "${var.name_prefix}/csp-calls"
  log_group_names = [aws_cloudwatch_log_group.api.name, aws_cloudwatch_log_group.jobs.name]
  query_string    = <<-EOT
    fields @timestamp, op, status, outcome, @logStream
    | filter target = "csp"
    | sort @timestamp desc
    | limit 200
  EOT
}

resource "aws_cloudwatch_query_definition" "csp_calls_summary" {
  name            = "${var.name_prefix}/csp-calls-summary"
  log_group_names = [aws_cloudwatch_log_group.api.name, aws_cloudwatch_log_group.jobs.name]
  query_string    = <<-EOT
    filter target = "csp"
    | stats count(*) as calls by op, outcome, status
    | sort calls desc
  EOT
}

resource "aws_cloudwatch_query_definition" "projector_lag" {
  name            = "${var.name_prefix}/projector-lag"
  log_group_names = [aws_cloudwatch_log_group.projector.name]
  query_string    = <<-EOT
    filter target = "projector" and message = "applied"
    | stats count(*) as applied, pct(lag_ms, 50) as p50_ms, pct(lag_ms, 99) as p99_ms, max(lag_ms) as max_ms by bin(1m)
    | sort @timestamp desc
  EOT
}

resource "aws_cloudwatch_query_definition" "request_by_id" {
  name            = "${var.name_prefix}/request-by-id"
  log_group_names = [aws_cloudwatch_log_group.api.name]
  query_string    = <<-EOT
    fields @timestamp, level, target, message, method, route, status, code, latency_ms
    | filter request_id = "REPLACE-WITH-X-REQUEST-ID"
    | sort @timestamp asc
  EOT
}

# ---------------------------------------------------------------------------
# Dashboard: the pool (API side) and the projector
# ---------------------------------------------------------------------------

locals {
  ns = var.metrics_namespace

  dashboard_widgets = [
    {
      type       = "text"
      x          = 0
      y          = 0
      width      = 24
      height     = 1
      properties = { markdown = "## Pool and API (from the JSON access log)" }
    },
    {
      type   = "metric"
      x      = 0
      y      = 1
      width  = 8
      height = 6
      properties = {
        title  = "Allocations vs. no sandbox available"
        region = var.aws_region
        stat   = "Sum"
        period = 300
        view   = "timeSeries"
        metrics = [
          [local.ns, "Allocations", { label = "allocated (200/201)" }],
          [local.ns, "NoSandboxesAvailable", { label = "409 NO_SANDBOXES_AVAILABLE", color = "#d62728" }],
        ]
      }
    },
    {
      type   = "metric"
      x      = 8
      y      = 1
      width  = 8
      height = 6
      properties = {
        title  = "Requests, 5xx, rate-limited"
        region = var.aws_region
        stat   = "Sum"
        period = 300
        view   = "timeSeries"
        metrics = [
          [local.ns, "ApiRequests", { label = "requests" }],
          [local.ns, "ApiErrors", { label = "5xx", color = "#d62728" }],
          [local.ns, "RateLimitHits", { label = "429", color = "#ff7f0e" }],
        ]
      }
    },
    {
      type   = "metric"
      x      = 16
      y      = 1
      width  = 8
      height = 6
      properties = {
        title  = "Request latency (ms)"
        region = var.aws_region
        period = 300
        view   = "timeSeries"
        metrics = [
          [local.ns, "RequestLatencyMs", { stat = "p50", label = "p50" }],
          [local.ns, "RequestLatencyMs", { stat = "p99", label = "p99" }],
          [local.ns, "SlowRequests", { stat = "Sum", label = "slow requests", yAxis = "right" }],
        ]
      }
    },
    {
      type   = "metric"
      x      = 0
      y      = 7
      width  = 8
      height = 6
      properties = {
        title  = "Job runs by job and outcome"
        region = var.aws_region
        stat   = "Sum"
        period = 3600
        view   = "timeSeries"
        metrics = [
          [{ expression = "SEARCH('{${local.ns},Job,Outcome} MetricName=\"JobRuns\"', 'Sum', 3600)", id = "runs" }],
        ]
      }
    },
    {
      type   = "metric"
      x      = 8
      y      = 7
      width  = 8
      height = 6
      properties = {
        title  = "CSP calls and errors"
        region = var.aws_region
        stat   = "Sum"
        period = 300
        view   = "timeSeries"
        metrics = [
          [local.ns, "CspCalls", { label = "calls" }],
          [local.ns, "CspErrors", { label = "errors", color = "#d62728" }],
        ]
      }
    },
    {
      type   = "metric"
      x      = 16
      y      = 7
      width  = 8
      height = 6
      properties = {
        title  = "API tasks (ALB)"
        region = var.aws_region
        period = 60
        view   = "timeSeries"
        metrics = [
          ["AWS/ApplicationELB", "HealthyHostCount", "TargetGroup", aws_lb_target_group.api.arn_suffix, "LoadBalancer", aws_lb.api.arn_suffix, { stat = "Minimum", label = "healthy tasks" }],
          ["AWS/ApplicationELB", "HTTPCode_ELB_5XX_Count", "LoadBalancer", aws_lb.api.arn_suffix, { stat = "Sum", label = "ALB 5xx", yAxis = "right" }],
        ]
      }
    },
    {
      type       = "text"
      x          = 0
      y          = 13
      width      = 24
      height     = 1
      properties = { markdown = "## Projector (events stream -> pool view)" }
    },
    {
      type   = "metric"
      x      = 0
      y      = 14
      width  = 8
      height = 6
      properties = {
        title  = "View lag and stream iterator age (ms)"
        region = var.aws_region
        period = 60
        view   = "timeSeries"
        metrics = [
          [local.ns, "ProjectorLagMs", { stat = "Maximum", label = "view lag (max)" }],
          [local.ns, "ProjectorLagMs", { stat = "p99", label = "view lag (p99)" }],
          ["AWS/Lambda", "IteratorAge", "FunctionName", aws_lambda_function.projector.function_name, { stat = "Maximum", label = "IteratorAge (max)" }],
        ]
        annotations = {
          horizontal = [{ label = "alarm", value = var.alarm_thresholds.projector_lag_ms }]
        }
      }
    },
    {
      type   = "metric"
      x      = 8
      y      = 14
      width  = 8
      height = 6
      properties = {
        title  = "Projector invocations"
        region = var.aws_region
        stat   = "Sum"
        period = 60
        view   = "timeSeries"
        metrics = [
          ["AWS/Lambda", "Invocations", "FunctionName", aws_lambda_function.projector.function_name],
          ["AWS/Lambda", "Errors", "FunctionName", aws_lambda_function.projector.function_name, { color = "#d62728" }],
          ["AWS/Lambda", "Throttles", "FunctionName", aws_lambda_function.projector.function_name, { color = "#ff7f0e" }],
          ["AWS/Lambda", "Duration", "FunctionName", aws_lambda_function.projector.function_name, { stat = "p99", yAxis = "right", label = "duration p99 (ms)" }],
        ]
      }
    },
    {
      type   = "metric"
      x      = 16
      y      = 14
      width  = 8
      height = 6
      properties = {
        title  = "Given-up records and failed schedules"
        region = var.aws_region
        stat   = "Maximum"
        period = 300
        view   = "timeSeries"
        metrics = [
          ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.projector_failures.name, { label = "projector failure queue" }],
          ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.scheduler_dlq.name, { label = "scheduler DLQ" }],
        ]
      }
    },
    {
      type   = "metric"
      x      = 0
      y      = 20
      width  = 12
      height = 6
      properties = {
        title  = "DynamoDB writes (consumed WCU)"
        region = var.aws_region
        stat   = "Sum"
        period = 60
        view   = "timeSeries"
        metrics = [
          ["AWS/DynamoDB", "ConsumedWriteCapacityUnits", "TableName", aws_dynamodb_table.events.name, { label = "events (commands)" }],
          ["AWS/DynamoDB", "ConsumedWriteCapacityUnits", "TableName", aws_dynamodb_table.pool.name, { label = "pool (projector)" }],
          ["AWS/DynamoDB", "ConsumedWriteCapacityUnits", "TableName", aws_dynamodb_table.stats.name, { label = "stats (projector)" }],
        ]
      }
    },
    {
      type   = "metric"
      x      = 12
      y      = 20
      width  = 12
      height = 6
      properties = {
        title  = "DynamoDB throttles and conditional-check failures"
        region = var.aws_region
        stat   = "Sum"
        period = 60
        view   = "timeSeries"
        metrics = [
          ["AWS/DynamoDB", "ConditionalCheckFailedRequests", "TableName", aws_dynamodb_table.events.name, { label = "events: version conflicts" }],
          ["AWS/DynamoDB", "WriteThrottleEvents", "TableName", aws_dynamodb_table.events.name, { label = "events: write throttles" }],
          ["AWS/DynamoDB", "WriteThrottleEvents", "TableName", aws_dynamodb_table.pool.name, { label = "pool: write throttles" }],
          ["AWS/DynamoDB", "ReadThrottleEvents", "TableName", aws_dynamodb_table.pool.name, { label = "pool: read throttles" }],
        ]
      }
    },
    {
      type   = "log"
      x      = 0
      y      = 26
      width  = 24
      height = 6
      properties = {
        title  = "Recent errors (all components)"
        region = var.aws_region
        view   = "table"
        query  = "SOURCE '${aws_cloudwatch_log_group.api.name}' | SOURCE '${aws_cloudwatch_log_group.jobs.name}' | SOURCE '${aws_cloudwatch_log_group.projector.name}' | fields @timestamp, target, message, status, code, job, op, request_id | filter level = \"ERROR\" or status >= 500 | sort @timestamp desc | limit 50"
      }
    },
  ]
}

resource "aws_cloudwatch_dashboard" "main" {
  dashboard_name = var.name_prefix
  dashboard_body = jsonencode({ widgets = local.dashboard_widgets })
}
