# The projector: a Lambda function on the events table's stream. It folds each
# new event into the pool view and the stats shards (conditional on the view
# row's version, so a redelivered record is a no-op).
#
# Failure handling of the event source mapping, from the inside out:
#   1. ReportBatchItemFailures: the function reports the first record it could
#      not apply; Lambda retries from that record, not the whole batch.
#   2. bisect_batch_on_function_error: on a crash/timeout the batch is split
#      in two and retried, isolating a poison record quickly.
#   3. Retries are bounded by record age (maximum_record_age_in_seconds, one
#      day by default), not by a small count: an outage or throttling burst of
#      any length under a day loses nothing (maximum_retry_attempts = -1).
#   4. Inside one invocation the function itself retries a transient store
#      failure (throttling, 5xx, timeouts) with a capped backoff until two
#      seconds before its deadline (projector/src/lambda.rs), so a short
#      throttling burst costs a pause, not a failed batch and a bisection.
#   5. on_failure destination: what is given up on is recorded (shard,
#      sequence-number range, arrival times) in an SQS queue; an alarm fires
#      on its depth.
#   6. Nothing given up on stays lost. Runbook (docs/operations.md, "Projector failures"):
#        aws sqs receive-message --queue-url "$(terraform output -raw projector_failure_queue_url)" \
#          --max-number-of-messages 10 > failed.json
#        projector redrive failed.json     # exit 0: delete the messages
#      `projector redrive` reads each batch back from the stream, or, once the
#      stream has trimmed it, re-projects the sandboxes of its arrival window
#      from the events table. The scheduled `projector verify --repair`
#      (jobs.tf) also re-projects every row that is behind its stream.

resource "aws_lambda_function" "projector" {
  #checkov:skip=CKV_AWS_116:A DLQ on the function only covers asynchronous invocations; stream invocations are synchronous and their failures go to the event source mapping's on-failure destination (aws_sqs_queue.projector_failures).
  #checkov:skip=CKV_AWS_272:Code signing needs an AWS Signer profile and a signing step outside this repository's build; the package comes from the project's own CI build (cargo lambda) and is deployed by hash (source_code_hash).
  function_name = "${var.name_prefix}-projector"
  description   = "Sandbox Broker projector: events stream -> pool view and stats"
  role          = aws_iam_role.projector.arn

  # A Rust binary named `bootstrap` on the OS-only runtime.
  runtime          = "provided.al2023"
  handler          = "bootstrap"
  architectures    = [var.projector_architecture]
  filename         = local.projector_lambda_zip
  source_code_hash = filebase64sha256(local.projector_lambda_zip)

  memory_size                    = var.projector_memory_mb
  timeout                        = var.projector_timeout_seconds
  reserved_concurrent_executions = var.projector_reserved_concurrency

  kms_key_arn = local.kms_key_arn

  environment {
    variables = local.projector_env
  }

  vpc_config {
    subnet_ids         = aws_subnet.private[*].id
    security_group_ids = [aws_security_group.projector.id]
  }

  # The function prints its own JSON lines; Text keeps them unwrapped so the
  # metric filters can match on $.target / $.lag_ms.
  logging_config {
    log_format = "Text"
    log_group  = aws_cloudwatch_log_group.projector.name
  }

  tracing_config {
    mode = "PassThrough"
  }

  depends_on = [
    aws_iam_role_policy.projector,
    aws_iam_role_policy_attachment.projector_vpc,
  ]
}

resource "aws_lambda_event_source_mapping" "projector" {
  event_source_arn = aws_dynamodb_table.events.stream_arn
  function_name    = aws_lambda_function.projector.arn

  # From the oldest record still in the stream: a first deployment (or a
  # re-created mapping) projects everything the stream still holds; anything
  # older is covered by `projector rebuild`.
  starting_position = "TRIM_HORIZON"

  batch_size                         = var.projector_batch_size
  maximum_batching_window_in_seconds = var.projector_batching_window_seconds
  parallelization_factor             = var.projector_parallelization_factor

  function_response_types        = ["ReportBatchItemFailures"]
  bisect_batch_on_function_error = true
  maximum_retry_attempts         = var.projector_max_retry_attempts
  maximum_record_age_in_seconds  = var.projector_max_record_age_seconds

  destination_config {
    on_failure {
      destination_arn = aws_sqs_queue.projector_failures.arn
    }
  }

  depends_on = [aws_iam_role_policy.projector]
}

# Records the mapping gave up on (metadata only: shard id and sequence-number
# range, not the events themselves). Kept 14 days, the SQS maximum.
resource "aws_sqs_queue" "projector_failures" {
  name                      = "${var.name_prefix}-projector-failures"
  message_retention_seconds = 1209600

  kms_master_key_id                 = local.kms_key_arn
  kms_data_key_reuse_period_seconds = local.kms_enabled ? 300 : null
  sqs_managed_sse_enabled           = local.kms_enabled ? null : true
}

resource "aws_sqs_queue_policy" "projector_failures" {
  queue_url = aws_sqs_queue.projector_failures.id
  policy    = data.aws_iam_policy_document.projector_failures_queue.json
}

data "aws_iam_policy_document" "projector_failures_queue" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["sqs:*"]
    resources = [aws_sqs_queue.projector_failures.arn]

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
