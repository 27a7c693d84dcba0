# Optional: forward the events table's stream to an EventBridge bus through an
# EventBridge Pipe, so other teams subscribe to broker events with their own
# rules without any access to the broker's tables. Off by default
# (var.events_bus_enabled).
#
# Each event reaches the bus once per stream record, as detail-type
# "Sandbox Broker event" from source var.events_bus_source; the detail is the
# DynamoDB stream record (see docs/events/asyncapi.yaml, channel
# eventsTableStream): the envelope's fields are in detail.dynamodb.NewImage
# and the payload is JSON text in detail.dynamodb.NewImage.payload.S. The pipe
# filters on the event type (var.events_bus_event_types; empty = every type)
# before anything is sent, so filtered records cost nothing on the bus.

locals {
  events_bus_create = var.events_bus_enabled && var.events_bus_name == null
  events_bus_arn = var.events_bus_enabled ? (
    local.events_bus_create ? aws_cloudwatch_event_bus.events[0].arn : "arn:${local.partition}:events:${var.aws_region}:${local.account_id}:event-bus/${var.events_bus_name}"
  ) : null

  # Events are only ever inserted; the filter also keeps out anything else.
  events_bus_filter = merge(
    { eventName = ["INSERT"] },
    length(var.events_bus_event_types) == 0 ? {} : {
      dynamodb = { NewImage = { event_type = { S = var.events_bus_event_types } } }
    },
  )
}

resource "aws_cloudwatch_event_bus" "events" {
  count = local.events_bus_create ? 1 : 0

  name               = "${var.name_prefix}-events"
  description        = "Sandbox Broker events, forwarded from the events table stream"
  kms_key_identifier = local.kms_key_arn
}

resource "aws_pipes_pipe" "events" {
  count = var.events_bus_enabled ? 1 : 0

  name        = "${var.name_prefix}-events-to-bus"
  description = "events table stream -> EventBridge bus, filtered by event type"
  role_arn    = aws_iam_role.events_pipe[0].arn
  source      = aws_dynamodb_table.events.stream_arn
  target      = local.events_bus_arn

  kms_key_identifier = local.kms_key_arn

  source_parameters {
    dynamodb_stream_parameters {
      # New subscribers start with new events; the history is in the table
      # (GET /v1/admin/events) for whoever needs it.
      starting_position      = "LATEST"
      batch_size             = 10
      maximum_retry_attempts = 10
      # Bounded by the stream's 24 h retention.
      maximum_record_age_in_seconds = 86400

      dead_letter_config {
        arn = aws_sqs_queue.events_pipe_failures[0].arn
      }
    }

    filter_criteria {
      filter {
        pattern = jsonencode(local.events_bus_filter)
      }
    }
  }

  target_parameters {
    eventbridge_event_bus_parameters {
      detail_type = "Sandbox Broker event"
      source      = var.events_bus_source
    }
  }
}

# Records the pipe gave up on (metadata: shard and sequence numbers; the events
# themselves stay in the events table). Kept 14 days, the SQS maximum.
resource "aws_sqs_queue" "events_pipe_failures" {
  count = var.events_bus_enabled ? 1 : 0

  name                      = "${var.name_prefix}-events-pipe-failures"
  message_retention_seconds = 1209600

  kms_master_key_id                 = local.kms_key_arn
  kms_data_key_reuse_period_seconds = local.kms_enabled ? 300 : null
  sqs_managed_sse_enabled           = local.kms_enabled ? null : true
}

data "aws_iam_policy_document" "events_pipe_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["pipes.amazonaws.com"]
    }

    # Only pipes of this account may use the role (confused deputy).
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "events_pipe" {
  count = var.events_bus_enabled ? 1 : 0

  name               = "${var.name_prefix}-events-pipe"
  description        = "EventBridge Pipe: read the events table stream, put events on the bus"
  assume_role_policy = data.aws_iam_policy_document.events_pipe_assume.json
}

data "aws_iam_policy_document" "events_pipe" {
  count = var.events_bus_enabled ? 1 : 0

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
    sid       = "PutEventsOnBus"
    actions   = ["events:PutEvents"]
    resources = [local.events_bus_arn]
  }

  statement {
    sid       = "SendFailedRecordsToQueue"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.events_pipe_failures[0].arn]
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

resource "aws_iam_role_policy" "events_pipe" {
  count = var.events_bus_enabled ? 1 : 0

  name   = "events-pipe"
  role   = aws_iam_role.events_pipe[0].id
  policy = data.aws_iam_policy_document.events_pipe[0].json
}

variable "events_bus_enabled" {
  description = "Forward the events table's stream to an EventBridge bus through an EventBridge Pipe (eventbridge.tf)."
  type        = bool
  default     = false
}

variable "events_bus_name" {
  description = "Name of an existing EventBridge bus to forward to; null creates <name_prefix>-events."
  type        = string
  default     = null
}

variable "events_bus_event_types" {
  description = "Event types forwarded to the bus (e.g. [\"SandboxAllocated\", \"DeletionFailed\"]); empty forwards every type. Names: docs/events/payloads/."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for t in var.events_bus_event_types : can(regex("^[A-Z][A-Za-z]+$", t))])
    error_message = "events_bus_event_types must be event type names such as SandboxAllocated."
  }
}

variable "events_bus_source" {
  description = "The `source` of the events put on the bus (what subscribers' rules match)."
  type        = string
  default     = "sandbox-broker"
}

output "events_bus_arn" {
  description = "ARN of the bus the events table stream is forwarded to (null when events_bus_enabled is false)."
  value       = local.events_bus_arn
}

output "events_pipe_failures_queue_url" {
  description = "Queue of stream records the events pipe gave up on (null when events_bus_enabled is false)."
  value       = var.events_bus_enabled ? aws_sqs_queue.events_pipe_failures[0].url : null
}
