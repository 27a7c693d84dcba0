# Tenancy (docs/tenancy.md, docs/threat-model.md, ADR 0021): per-track
# credentials from Secrets Manager, the lease-token key, fair-share caps, and
# the switch that ends the shared track token.
#
# Secret values are write-only from ephemeral inputs (never in state or plans),
# written when their *_version variable changes, like the tokens in secrets.tf.

variable "track_credentials_json" {
  description = "TRACK_CREDENTIALS_JSON: the per-track credentials document ({\"tracks\": [{\"track\", \"token\", \"name_prefixes\", \"max_concurrent_allocations\" (required: the track's seats), optional \"max_allocations_per_caller\", \"caller_secret\", \"require_caller_signature\"}]}). Ephemeral and write-only; used when track_credentials_enabled."
  type        = string
  default     = null
  sensitive   = true
  ephemeral   = true
}

variable "track_credentials_enabled" {
  description = "Create the track-credentials secret and hand it to the API as TRACK_CREDENTIALS_JSON (set track_credentials_json when turning it on)."
  type        = bool
  default     = false
}

variable "track_credentials_version" {
  description = "Increment to write a new track_credentials_json to Secrets Manager (adding a track, rotating a track token). Restart the API afterwards."
  type        = number
  default     = 1

  validation {
    condition     = var.track_credentials_version >= 1 && floor(var.track_credentials_version) == var.track_credentials_version
    error_message = "track_credentials_version must be a positive integer."
  }
}

variable "shared_track_token_enabled" {
  description = "SHARED_TRACK_TOKEN_ENABLED: accept the shared track token. Turn it off once every track has its own credential: that ends the migration."
  type        = bool
  default     = true
}

variable "require_lease_token" {
  description = "REQUIRE_LEASE_TOKEN: require the lease capability (X-Lease-Token, a strong Idempotency-Key) from the shared token too. Per-track credentials always require it."
  type        = bool
  default     = false
}

variable "max_allocations_per_caller" {
  description = "MAX_ALLOCATIONS_PER_CALLER: live allocations one caller id may hold per track (a credential's max_allocations_per_caller overrides it; 0 turns the cap off)."
  type        = number
  default     = 1

  validation {
    condition     = var.max_allocations_per_caller >= 0 && floor(var.max_allocations_per_caller) == var.max_allocations_per_caller
    error_message = "max_allocations_per_caller must be a whole number (0: off)."
  }
}

variable "max_allocations_per_address" {
  description = "MAX_ALLOCATIONS_PER_ADDRESS: live allocations per client address (the ALB's X-Forwarded-For hop). Null: off, the right choice when labs share one egress address; set it when each lab VM has its own."
  type        = number
  default     = null

  validation {
    condition     = var.max_allocations_per_address == null || coalesce(var.max_allocations_per_address, 1) >= 1
    error_message = "max_allocations_per_address must be at least 1 (or null for off)."
  }
}

variable "shared_token_quota" {
  description = "DEFAULT_TRACK_QUOTA: live allocations of the shared track token as a whole (outside the tracks TRACK_QUOTAS names). Size it to the seats of the tracks still on the shared token; null removes the cap."
  type        = number
  default     = 100

  validation {
    condition     = var.shared_token_quota == null || coalesce(var.shared_token_quota, 1) >= 1
    error_message = "shared_token_quota must be at least 1 (or null for no cap)."
  }
}

variable "caller_signature_window_sec" {
  description = "CALLER_SIGNATURE_WINDOW_SEC: how far a caller signature's time may be from the server's, seconds."
  type        = number
  default     = 300

  validation {
    condition     = var.caller_signature_window_sec >= 30 && var.caller_signature_window_sec <= 3600
    error_message = "caller_signature_window_sec must be between 30 and 3600."
  }
}

variable "lease_token_key_version" {
  description = "Increment to generate a new LEASE_TOKEN_KEY (its id becomes k<version>). For an overlapping rotation, pass the current key as lease_token_key_previous in the same run (docs/tenancy.md)."
  type        = number
  default     = 1

  validation {
    condition     = var.lease_token_key_version >= 1 && floor(var.lease_token_key_version) == var.lease_token_key_version
    error_message = "lease_token_key_version must be a positive integer."
  }
}

variable "lease_token_key_previous" {
  description = "LEASE_TOKEN_KEY_PREVIOUS during a rotation: the key being retired (it verifies its tokens, issues none). Ephemeral and write-only; written when lease_token_key_version changes."
  type        = string
  default     = null
  sensitive   = true
  ephemeral   = true
}

variable "lease_token_key_previous_enabled" {
  description = "Hand LEASE_TOKEN_KEY_PREVIOUS (id k<version-1>) to the API; turn it off one lab window (plus extensions) after a rotation."
  type        = bool
  default     = false
}

resource "aws_secretsmanager_secret" "track_credentials" {
  #checkov:skip=CKV2_AWS_57:The track tokens are configured in Instruqt tracks outside AWS; rotation is manual and versioned (track_credentials_version).
  count = var.track_credentials_enabled ? 1 : 0

  name                    = "${var.name_prefix}/track-credentials"
  description             = "TRACK_CREDENTIALS_JSON: per-track tokens, prefixes, quotas and caller secrets"
  kms_key_id              = local.kms_key_arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "track_credentials" {
  count = var.track_credentials_enabled ? 1 : 0

  secret_id                = aws_secretsmanager_secret.track_credentials[0].id
  secret_string_wo         = var.track_credentials_json
  secret_string_wo_version = var.track_credentials_version
}

resource "aws_secretsmanager_secret" "lease_token_key" {
  #checkov:skip=CKV2_AWS_57:A lease-key rotation must overlap with the previous key (LEASE_TOKEN_KEY_PREVIOUS) for one lab window, which a rotation Lambda cannot keep; rotation is manual and versioned (lease_token_key_version).
  name                    = "${var.name_prefix}/lease-token-key"
  description             = "LEASE_TOKEN_KEY: derives the lease tokens that guard each sandbox"
  kms_key_id              = local.kms_key_arn
  recovery_window_in_days = 7
}

ephemeral "random_password" "lease_token_key" {
  length  = 48
  special = false
}

resource "aws_secretsmanager_secret_version" "lease_token_key" {
  secret_id                = aws_secretsmanager_secret.lease_token_key.id
  secret_string_wo         = ephemeral.random_password.lease_token_key.result
  secret_string_wo_version = var.lease_token_key_version
}

resource "aws_secretsmanager_secret" "lease_token_key_previous" {
  #checkov:skip=CKV2_AWS_57:Holds the retired lease key only during a manual, overlapping rotation (lease_token_key_version).
  count = var.lease_token_key_previous_enabled ? 1 : 0

  name                    = "${var.name_prefix}/lease-token-key-previous"
  description             = "LEASE_TOKEN_KEY_PREVIOUS: the lease key being rotated out"
  kms_key_id              = local.kms_key_arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "lease_token_key_previous" {
  count = var.lease_token_key_previous_enabled ? 1 : 0

  secret_id                = aws_secretsmanager_secret.lease_token_key_previous[0].id
  secret_string_wo         = var.lease_token_key_previous
  secret_string_wo_version = var.lease_token_key_version
}

locals {
  tenancy_env = merge(
    {
      SHARED_TRACK_TOKEN_ENABLED  = tostring(var.shared_track_token_enabled)
      REQUIRE_LEASE_TOKEN         = tostring(var.require_lease_token)
      MAX_ALLOCATIONS_PER_CALLER  = tostring(var.max_allocations_per_caller)
      CALLER_SIGNATURE_WINDOW_SEC = tostring(var.caller_signature_window_sec)
      LEASE_TOKEN_KEY_ID          = "k${var.lease_token_key_version}"
    },
    var.lease_token_key_previous_enabled ? { LEASE_TOKEN_KEY_PREVIOUS_ID = "k${var.lease_token_key_version - 1}" } : {},
    {
      for name, value in {
        MAX_ALLOCATIONS_PER_ADDRESS = var.max_allocations_per_address
        DEFAULT_TRACK_QUOTA         = var.shared_token_quota
      } : name => tostring(value) if value != null
    },
  )

  tenancy_secrets = merge(
    { LEASE_TOKEN_KEY = aws_secretsmanager_secret.lease_token_key.arn },
    var.track_credentials_enabled ? { TRACK_CREDENTIALS_JSON = aws_secretsmanager_secret.track_credentials[0].arn } : {},
    var.lease_token_key_previous_enabled ? { LEASE_TOKEN_KEY_PREVIOUS = aws_secretsmanager_secret.lease_token_key_previous[0].arn } : {},
  )
}
