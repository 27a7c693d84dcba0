# Log groups are created here (not by the services) so that retention and
# encryption are set before the first line is written, and so the execution
# roles need no logs:CreateLogGroup.

resource "aws_cloudwatch_log_group" "api" {
  name              = "/${var.name_prefix}/api"
  retention_in_days = var.log_retention_days
  kms_key_id        = local.kms_key_arn
}

resource "aws_cloudwatch_log_group" "jobs" {
  name              = "/${var.name_prefix}/jobs"
  retention_in_days = var.log_retention_days
  kms_key_id        = local.kms_key_arn
}

resource "aws_cloudwatch_log_group" "ops" {
  name              = "/${var.name_prefix}/ops"
  retention_in_days = var.log_retention_days
  kms_key_id        = local.kms_key_arn
}

# Lambda writes to /aws/lambda/<function name> unless told otherwise; the
# function's logging_config points here explicitly.
resource "aws_cloudwatch_log_group" "projector" {
  name              = "/aws/lambda/${var.name_prefix}-projector"
  retention_in_days = var.log_retention_days
  kms_key_id        = local.kms_key_arn
}

resource "aws_cloudwatch_log_group" "flow_logs" {
  name              = "/${var.name_prefix}/vpc-flow-logs"
  retention_in_days = var.log_retention_days
  kms_key_id        = local.kms_key_arn
}

# WAF requires the "aws-waf-logs-" prefix for CloudWatch destinations.
resource "aws_cloudwatch_log_group" "waf" {
  count = var.enable_waf ? 1 : 0

  name              = "aws-waf-logs-${var.name_prefix}"
  retention_in_days = var.log_retention_days
  kms_key_id        = local.kms_key_arn
}
