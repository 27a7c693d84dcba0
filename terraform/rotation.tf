# Rotation with overlap of the shared track token and the admin token
# (docs/security.md, "Rotating secrets"). Each rotates on its own: set the new
# value as usual (broker_api_token / broker_admin_token with a new
# broker_tokens_version), and hand the value being replaced to the API as the
# previous one with the end of the overlap. Labs that started with the old track
# token keep working until then. Remove the previous value (set its _until to
# null) after the overlap; the API refuses it from that time on in any case.
#
# The per-track tokens and caller secrets rotate inside track_credentials_json
# (previous_token / previous_token_until, previous_caller_secret /
# previous_caller_secret_until), the webhook secrets inside webhooks_json
# (previous_secret / previous_secret_until), the lease-token key with
# lease_token_key_previous (tenancy.tf).

variable "broker_api_token_previous" {
  description = "BROKER_API_TOKEN_PREVIOUS during a rotation of the track token: the value being replaced. Ephemeral and write-only; written when broker_api_token_previous_until changes."
  type        = string
  default     = null
  sensitive   = true
  ephemeral   = true
}

variable "broker_api_token_previous_until" {
  description = "End of the track token's overlap (RFC 3339, at most 30 days ahead; null: no rotation in progress). Outlast the longest lab (lab_duration_hours plus extensions)."
  type        = string
  default     = null
}

variable "broker_admin_token_previous" {
  description = "BROKER_ADMIN_TOKEN_PREVIOUS during a rotation of the admin token: the value being replaced. Ephemeral and write-only; written when broker_admin_token_previous_until changes."
  type        = string
  default     = null
  sensitive   = true
  ephemeral   = true
}

variable "broker_admin_token_previous_until" {
  description = "End of the admin token's overlap (RFC 3339, at most 30 days ahead; null: no rotation in progress)."
  type        = string
  default     = null
}

locals {
  # Which tokens are being rotated, by the environment name the API reads.
  token_rotations = {
    for name, until in {
      BROKER_API_TOKEN   = var.broker_api_token_previous_until
      BROKER_ADMIN_TOKEN = var.broker_admin_token_previous_until
    } : name => until if until != null
  }

  rotation_env = { for name, until in local.token_rotations : "${name}_PREVIOUS_UNTIL" => until }

  rotation_secrets = {
    for name, _ in local.token_rotations : "${name}_PREVIOUS" => aws_secretsmanager_secret.previous_token[name].arn
  }
}

resource "aws_secretsmanager_secret" "previous_token" {
  #checkov:skip=CKV2_AWS_57:Holds the value being rotated out for a set overlap; it is written by hand with the rotation and removed after it, never rotated itself.
  for_each = local.token_rotations

  name                    = "${var.name_prefix}/${lower(replace(each.key, "_", "-"))}-previous"
  description             = "${each.key}_PREVIOUS: the value being rotated out, accepted until ${each.value}"
  kms_key_id              = local.kms_key_arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "previous_token" {
  for_each = local.token_rotations

  secret_id        = aws_secretsmanager_secret.previous_token[each.key].id
  secret_string_wo = each.key == "BROKER_API_TOKEN" ? var.broker_api_token_previous : var.broker_admin_token_previous
  # A new overlap end writes the value again (the write-only value has no other trigger).
  secret_string_wo_version = parseint(formatdate("YYYYMMDDhhmmss", each.value), 10)
}
