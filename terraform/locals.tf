locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  # Explicit zones win; otherwise the first az_count zones in name order
  # (Local Zones and opt-in zones are filtered out in providers.tf).
  azs = var.availability_zones != null ? var.availability_zones : slice(sort(data.aws_availability_zones.available.names), 0, var.az_count)

  # One customer-managed key for everything, unless the caller brings one, or
  # opts out (then AWS-managed keys: null here means "service default").
  kms_key_arn = var.kms_key_arn != null ? var.kms_key_arn : (var.create_kms_key ? aws_kms_key.main[0].arn : null)
  kms_enabled = var.kms_key_arn != null || var.create_kms_key

  # The image every ECS task runs: the API server, the job runner and the
  # projector CLI are three binaries in one image (see the Dockerfile).
  container_image = coalesce(var.container_image, "${aws_ecr_repository.app.repository_url}:${var.image_tag}")

  projector_lambda_zip = coalesce(var.projector_lambda_zip, "${path.module}/../target/lambda/projector-lambda/bootstrap.zip")

  # Table ARNs used by IAM policies and the DynamoDB endpoint policy.
  table_arns = {
    events      = aws_dynamodb_table.events.arn
    pool        = aws_dynamodb_table.pool.arn
    stats       = aws_dynamodb_table.stats.arn
    checkpoints = aws_dynamodb_table.checkpoints.arn
    subjects    = aws_dynamodb_table.subjects.arn
  }

  # Environment shared by every component that talks to the store. Values are
  # strings because ECS and Lambda only take strings.
  store_env = {
    STORE             = "dynamodb"
    TABLE_PREFIX      = var.table_prefix
    STATS_SHARDS      = tostring(var.stats_shards)
    VIEW_INDEX_SHARDS = tostring(var.view_index_shards)
    LOG_FORMAT        = "json"
    RUST_LOG          = var.rust_log
  }

  # Lifecycle policy shared by the API (sets expires_at, checks the mark
  # window) and the jobs (auto-expire): both must agree.
  lifecycle_env = {
    LAB_DURATION_HOURS   = tostring(var.lab_duration_hours)
    GRACE_PERIOD_MINUTES = tostring(var.grace_period_minutes)
  }

  # CSP client settings shared by the API (admin endpoints) and the jobs.
  # Optional ones are left out when null so the code's defaults apply.
  csp_env = merge(
    {
      CSP_MODE                    = "real"
      CSP_BASE_URL                = var.csp_base_url
      DELETION_RETRY_MAX_ATTEMPTS = tostring(var.deletion_retry_max_attempts)
      CIRCUIT_BREAKER_THRESHOLD   = tostring(var.circuit_breaker_threshold)
      CIRCUIT_BREAKER_TIMEOUT_SEC = tostring(var.circuit_breaker_timeout_sec)
    },
    {
      for name, value in {
        CSP_TIMEOUT_CONNECT_SEC = var.csp_timeout_connect_sec
        CSP_TIMEOUT_READ_SEC    = var.csp_timeout_read_sec
      } : name => tostring(value) if value != null
    },
  )

  api_env = merge(local.store_env, local.lifecycle_env, local.csp_env, local.tenancy_env, local.rotation_env, local.personal_data_env, local.reservations_env, local.heartbeat_usage_env, local.waiting_line_env, {
    AWS_REGION           = var.aws_region
    BIND_ADDR            = "0.0.0.0:8080"
    API_BASE_PATH        = "/v1"
    K_CANDIDATES         = tostring(var.k_candidates)
    RATE_LIMIT_RPS       = tostring(var.rate_limit_rps)
    RATE_LIMIT_BURST     = tostring(var.rate_limit_burst)
    READY_MAX_LAG_MS     = tostring(var.ready_max_lag_ms)
    CORS_ALLOWED_ORIGINS = join(",", var.cors_allowed_origins)
    POOL_LOW_WATER       = var.pool_low_water
    # The server's keep-alive idle timeout must exceed the ALB's, or the ALB
    # may send a request on a connection the task is closing (a 502).
    # HEADER_READ_TIMEOUT_SEC keeps its short default: it no longer doubles as
    # the idle timeout (ADR 0024).
    IDLE_TIMEOUT_SEC = tostring(var.alb_idle_timeout_seconds + 15)
    # The ALB appends the client address to X-Forwarded-For: one trusted hop,
    # so unauthenticated rate limits key on the client, not on the ALB. Only
    # peers in the ALB's subnets may say so, and they are never held to
    # MAX_CONNECTIONS_PER_ADDRESS (every request arrives from their addresses).
    TRUSTED_PROXY_HOPS = "1"
    TRUSTED_PROXIES    = join(",", var.alb_internal ? aws_subnet.private[*].cidr_block : aws_subnet.public[*].cidr_block)
    # Read repair writes the view through the projector's conditional apply
    # (IAM: ReadRepairOfTheView in iam.tf).
    READ_REPAIR = "true"
    # In AWS the projector is the Lambda and the jobs are scheduled tasks:
    # the API process must not run either in-process.
    RUN_PROJECTOR = "false"
    RUN_JOBS      = "false"
  })

  jobs_env = merge(local.store_env, local.lifecycle_env, local.csp_env, local.reservations_env, local.heartbeat_usage_env,
    {
      AWS_REGION          = var.aws_region
      CLEANUP_CONCURRENCY = tostring(var.cleanup_concurrency)
      STALE_GRACE_HOURS   = tostring(var.stale_grace_hours)
    },
    {
      for name, value in {
        CLEANUP_PER_SANDBOX_DELAY_SEC = var.cleanup_per_sandbox_delay_sec
      } : name => tostring(value) if value != null
    },
  )

  # `projector verify|rebuild` run as one-off ECS tasks by an operator.
  ops_env = merge(local.store_env, {
    AWS_REGION = var.aws_region
  })

  # Lambda sets AWS_REGION itself (it is a reserved variable there).
  projector_env = local.store_env

  # Secrets injected by ECS from Secrets Manager: never plain environment values.
  api_secrets = merge(
    {
      BROKER_API_TOKEN   = aws_secretsmanager_secret.broker_api_token.arn
      BROKER_ADMIN_TOKEN = aws_secretsmanager_secret.broker_admin_token.arn
      CSP_API_TOKEN      = aws_secretsmanager_secret.csp_api_token.arn
      # /metrics answers only with it (secrets.tf).
      METRICS_TOKEN = aws_secretsmanager_secret.metrics_token.arn
    },
    # The subscribers carry HMAC secrets: a secret, never an environment value.
    var.webhooks_enabled ? { WEBHOOKS_JSON = aws_secretsmanager_secret.webhooks[0].arn } : {},
    # The lease-token key and the per-track credentials (tenancy.tf).
    local.tenancy_secrets,
    # The previous values of tokens being rotated (rotation.tf).
    local.rotation_secrets,
    # The pseudonym key (personal_data.tf).
    local.personal_data_secrets,
  )
  # The jobs act through commands directly on the store, not through the HTTP
  # API, so they get the CSP token only (the reference handed the worker every
  # token as a plain environment value).
  jobs_secrets = {
    CSP_API_TOKEN = aws_secretsmanager_secret.csp_api_token.arn
  }

  api_url = var.api_domain_name != null ? "https://${var.api_domain_name}" : "https://${aws_lb.api.dns_name}"
}
