# Secrets: the track token, the admin token and the CSP API token live in
# Secrets Manager and reach the containers only as ECS `secrets` (resolved by
# the ECS agent at task start), never as plain environment values and never in
# a task definition.
#
# Values are written with write-only arguments from ephemeral inputs: they are
# not stored in the Terraform state or in saved plans. A value is (re)written
# only when its *_version variable changes, which is also how to rotate.
# Running tasks keep the value they started with: after a rotation, force a new
# deployment of the API service (docs/operations.md, "Rotate a token").

resource "aws_secretsmanager_secret" "broker_api_token" {
  #checkov:skip=CKV2_AWS_57:The track token is shared with Instruqt track configurations outside AWS; automatic rotation would break every track. Rotation is manual and versioned (broker_tokens_version).
  name                    = "${var.name_prefix}/broker-api-token"
  description             = "BROKER_API_TOKEN: bearer token of the Instruqt tracks (track endpoints)"
  kms_key_id              = local.kms_key_arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret" "broker_admin_token" {
  #checkov:skip=CKV2_AWS_57:The admin token is held by operators and the admin dashboard outside AWS; rotation is manual and versioned (broker_tokens_version).
  name                    = "${var.name_prefix}/broker-admin-token"
  description             = "BROKER_ADMIN_TOKEN: bearer token of the admin endpoints"
  kms_key_id              = local.kms_key_arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret" "csp_api_token" {
  #checkov:skip=CKV2_AWS_57:The CSP API token is issued by the Infoblox CSP portal; AWS cannot rotate it. Rotation is manual and versioned (csp_api_token_version).
  name                    = "${var.name_prefix}/csp-api-token"
  description             = "CSP_API_TOKEN: token for the Infoblox CSP API (sync and cleanup)"
  kms_key_id              = local.kms_key_arn
  recovery_window_in_days = 7
}

# Generated tokens, used only when no token is supplied. Ephemeral: a fresh
# value is produced on every run but only written when broker_tokens_version
# changes, so the stored token is stable between rotations.
ephemeral "random_password" "broker_api_token" {
  length  = 48
  special = false
}

ephemeral "random_password" "broker_admin_token" {
  length  = 48
  special = false
}

resource "aws_secretsmanager_secret_version" "broker_api_token" {
  secret_id                = aws_secretsmanager_secret.broker_api_token.id
  secret_string_wo         = var.broker_api_token != null ? var.broker_api_token : ephemeral.random_password.broker_api_token.result
  secret_string_wo_version = var.broker_tokens_version
}

resource "aws_secretsmanager_secret_version" "broker_admin_token" {
  secret_id                = aws_secretsmanager_secret.broker_admin_token.id
  secret_string_wo         = var.broker_admin_token != null ? var.broker_admin_token : ephemeral.random_password.broker_admin_token.result
  secret_string_wo_version = var.broker_tokens_version
}

# METRICS_TOKEN: /metrics answers only to a scrape that sends it, whether the
# scraper sits in the VPC or reaches the ALB (expose_metrics_publicly).
resource "aws_secretsmanager_secret" "metrics_token" {
  #checkov:skip=CKV2_AWS_57:The metrics token is configured in the operators' Prometheus outside AWS; rotation is manual and versioned (metrics_token_version).
  name                    = "${var.name_prefix}/metrics-token"
  description             = "METRICS_TOKEN: bearer token a /metrics scrape must send"
  kms_key_id              = local.kms_key_arn
  recovery_window_in_days = 7
}

ephemeral "random_password" "metrics_token" {
  length  = 48
  special = false
}

resource "aws_secretsmanager_secret_version" "metrics_token" {
  secret_id                = aws_secretsmanager_secret.metrics_token.id
  secret_string_wo         = var.metrics_token != null ? var.metrics_token : ephemeral.random_password.metrics_token.result
  secret_string_wo_version = var.metrics_token_version
}

resource "aws_secretsmanager_secret_version" "csp_api_token" {
  secret_id                = aws_secretsmanager_secret.csp_api_token.id
  secret_string_wo         = var.csp_api_token
  secret_string_wo_version = var.csp_api_token_version
}

# Webhook subscribers (docs/adr/0018): WEBHOOKS_JSON holds each subscriber's
# HMAC secret, so it is a secret like the tokens, never a plain environment
# value. Only the API's execution role may read it (local.api_secrets feeds
# its ReadOwnSecrets statement in iam.tf).
resource "aws_secretsmanager_secret" "webhooks" {
  #checkov:skip=CKV2_AWS_57:The subscriber secrets are shared with the receiving lab platforms outside AWS; rotation is manual and versioned (webhooks_json_version).
  count = var.webhooks_enabled ? 1 : 0

  name                    = "${var.name_prefix}/webhooks-json"
  description             = "WEBHOOKS_JSON: webhook subscribers of the API (URLs, prefixes, HMAC secrets)"
  kms_key_id              = local.kms_key_arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "webhooks" {
  count = var.webhooks_enabled ? 1 : 0

  secret_id                = aws_secretsmanager_secret.webhooks[0].id
  secret_string_wo         = var.webhooks_json
  secret_string_wo_version = var.webhooks_json_version
}
