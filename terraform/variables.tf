# Input variables. Every variable has a description; constrained ones have a
# validation block so a bad value fails at `terraform plan`, not at 3 a.m.
# Required (no default): aws_region, certificate_arn, image_tag, csp_base_url,
# csp_api_token. See terraform.tfvars.example and docs/deploy-aws.md.

# ---------------------------------------------------------------------------
# General
# ---------------------------------------------------------------------------

variable "aws_region" {
  description = "AWS region to deploy into, e.g. us-east-1. Used for the provider, the DynamoDB gateway endpoint service name, log configuration and dashboards."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.aws_region))
    error_message = "aws_region must look like an AWS region code, e.g. us-east-1 or eu-central-1."
  }
}

variable "name_prefix" {
  description = "Prefix for the names of every non-table resource (cluster, ALB, roles, log groups, alarms). Short because ALB and target-group names are limited to 32 characters."
  type        = string
  default     = "sandbox-broker"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name_prefix))
    error_message = "name_prefix must be 3-20 characters of lowercase letters, digits and hyphens, starting with a letter and not ending with a hyphen."
  }
}

variable "table_prefix" {
  description = "Prefix of the DynamoDB table names (<prefix>-events, -pool, -stats, -checkpoints). Passed to every component as TABLE_PREFIX, so code and infrastructure agree."
  type        = string
  default     = "sandbox-broker"

  validation {
    condition     = can(regex("^[a-zA-Z0-9_.-]{3,200}$", var.table_prefix))
    error_message = "table_prefix may contain only letters, digits, '_', '-' and '.', 3-200 characters (DynamoDB table-name rules)."
  }
}

variable "tags" {
  description = "Extra tags applied to every resource through the provider's default_tags (e.g. Environment, Owner, CostCenter)."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------
# Encryption
# ---------------------------------------------------------------------------

variable "create_kms_key" {
  description = "Create one customer-managed KMS key (with rotation) for the tables, secrets, logs, SNS topic, ECR and the Lambda environment. Ignored when kms_key_arn is set. If false and kms_key_arn is null, AWS-managed keys are used (tables and secrets stay encrypted; the alarm topic is then unencrypted because CloudWatch cannot publish to a topic encrypted with the AWS-managed SNS key)."
  type        = bool
  default     = true
}

variable "kms_key_arn" {
  description = "ARN of an existing customer-managed KMS key to use instead of creating one. Its key policy must allow CloudWatch Logs, CloudWatch alarms and EventBridge (see kms.tf for the statements this module would create)."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[a-f0-9-]+$", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>) or null."
  }
}

# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

variable "table_deletion_protection" {
  description = "Enable DynamoDB deletion protection on all four tables. The events table is the only source of truth: leave this on in production."
  type        = bool
  default     = true
}

# ---------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "CIDR block of the VPC created for the broker. A /16 to /18: public subnets get /24-sized slices (ALB, NAT), private subnets /20-sized slices (Fargate tasks, Lambda ENIs)."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr)) && tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 18
    error_message = "vpc_cidr must be a valid IPv4 CIDR with a prefix length between /16 and /18."
  }
}

variable "az_count" {
  description = "Number of availability zones to spread subnets, tasks and the ALB over (2 or 3)."
  type        = number
  default     = 2

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 3
    error_message = "az_count must be 2 or 3 (an ALB needs at least two zones)."
  }
}

variable "availability_zones" {
  description = "Optional explicit availability zone names (exactly az_count of them, in aws_region). Null picks the first az_count zones of the region in name order."
  type        = list(string)
  default     = null

  validation {
    # HCL's || does not short-circuit: try() keeps the null case from erroring.
    condition     = var.availability_zones == null || try(alltrue([for z in var.availability_zones : can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9][a-z]$", z))]), false)
    error_message = "availability_zones must be zone names such as <region>a, <region>b, or null."
  }

  validation {
    condition     = var.availability_zones == null || try(length(var.availability_zones) == var.az_count, false)
    error_message = "availability_zones must list exactly az_count zones."
  }
}

variable "nat_gateway_per_az" {
  description = "One NAT gateway per availability zone (survives the loss of a zone; costs one NAT gateway per zone). False uses a single NAT gateway. Private tasks need NAT to reach the CSP API, ECR, Secrets Manager and CloudWatch Logs; DynamoDB traffic uses the free gateway endpoint instead."
  type        = bool
  default     = false
}

# ---------------------------------------------------------------------------
# Load balancer and edge
# ---------------------------------------------------------------------------

variable "s3_gateway_endpoint" {
  description = "Add a (free) S3 gateway endpoint to the private route tables. ECR serves image layers from S3, so every task start (each scheduled job run pulls the image) otherwise sends its layers through the NAT gateway at the NAT's per-GB processing price. Off by default (today's topology); see docs/aws-capacity-cost.md."
  type        = bool
  default     = false
}

variable "certificate_arn" {
  description = "ARN of the ACM certificate for the HTTPS listener (must be in aws_region and cover api_domain_name if set)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:acm:[a-z0-9-]+:[0-9]{12}:certificate/[A-Za-z0-9-]+$", var.certificate_arn))
    error_message = "certificate_arn must be an ACM certificate ARN (arn:aws:acm:<region>:<account>:certificate/<id>)."
  }
}

variable "api_domain_name" {
  description = "Optional DNS name clients use for the API (e.g. broker.example.com). Only used for the api_url output and, with route53_zone_id, for an alias record."
  type        = string
  default     = null

  validation {
    condition     = var.api_domain_name == null || can(regex("^([a-z0-9]([a-z0-9-]*[a-z0-9])?\\.)+[a-z]{2,}$", var.api_domain_name))
    error_message = "api_domain_name must be a lowercase DNS name or null."
  }
}

variable "route53_zone_id" {
  description = "Optional Route 53 hosted zone id; with api_domain_name set, an alias A record pointing at the ALB is created."
  type        = string
  default     = null

  validation {
    condition     = var.route53_zone_id == null || can(regex("^Z[A-Z0-9]{1,31}$", var.route53_zone_id))
    error_message = "route53_zone_id must be a Route 53 hosted zone id (starts with Z) or null."
  }
}

variable "alb_internal" {
  description = "Make the ALB internal (private subnets only). Instruqt tracks call the broker over the internet, so the default is an internet-facing ALB."
  type        = bool
  default     = false
}

variable "alb_ingress_cidrs" {
  description = "IPv4 CIDR blocks allowed to reach the ALB on 443 (and 80, which only redirects to 443). Narrow this if the callers' egress ranges are known."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.alb_ingress_cidrs) > 0 && alltrue([for c in var.alb_ingress_cidrs : can(cidrnetmask(c))])
    error_message = "alb_ingress_cidrs must be a non-empty list of valid IPv4 CIDR blocks."
  }
}

variable "operator_cidrs" {
  description = "IPv4 CIDR blocks allowed to reach the operator paths (/v1/admin*, /dashboard*, /v1/docs*, /v1/openapi.json) through the ALB; every other source gets 403 there. Empty (the default): operator paths are closed at the ALB (reach them from inside the VPC)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.operator_cidrs : can(cidrnetmask(c))]) && length(var.operator_cidrs) <= 40
    error_message = "operator_cidrs must be valid IPv4 CIDR blocks, at most 40 (each allow rule takes four; the listener has a rule limit)."
  }
}

variable "alb_idle_timeout_seconds" {
  description = "Idle timeout of the ALB's connections, seconds. The API closes a keep-alive connection idle for IDLE_TIMEOUT_SEC, which is set to this value + 15 so that the ALB, not the target, always closes an idle connection first (otherwise the ALB may reuse a connection the task is closing: a 502). See docs/aws-capacity-cost.md."
  type        = number
  default     = 60

  validation {
    condition     = var.alb_idle_timeout_seconds >= 1 && var.alb_idle_timeout_seconds <= 4000
    error_message = "alb_idle_timeout_seconds must be between 1 and 4000."
  }
}

variable "alb_deletion_protection" {
  description = "Enable deletion protection on the ALB (its DNS name is what the tracks are configured with)."
  type        = bool
  default     = true
}

variable "alb_access_logs_bucket" {
  description = "Optional existing S3 bucket for ALB access logs (its policy must allow the regional ELB log-delivery principal). Null disables ALB access logs; the API's own JSON access log in CloudWatch records every request either way."
  type        = string
  default     = null

  validation {
    condition     = var.alb_access_logs_bucket == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.alb_access_logs_bucket))
    error_message = "alb_access_logs_bucket must be a valid S3 bucket name or null."
  }
}

variable "expose_metrics_publicly" {
  description = "Let the ALB forward /metrics to the API (which still requires METRICS_TOKEN). False (default) answers /metrics with 404 at the ALB so the Prometheus endpoint is not public (the reference exposed it)."
  type        = bool
  default     = false
}

variable "enable_waf" {
  description = "Attach an AWS WAF web ACL to the ALB: AWS managed common, known-bad-inputs and IP-reputation rule groups plus a per-IP rate-based rule. Logs go to CloudWatch with the Authorization header redacted. On by default: the rate rule is the flood guard in front of the broker's own limiter."
  type        = bool
  default     = true
}

variable "waf_rate_limit_per_ip" {
  description = "WAF rate-based rule: maximum requests per source IP in any 5-minute window before WAF blocks that IP. A coarse flood guard in front of the broker's own per-caller rate limiter."
  type        = number
  default     = 10000

  validation {
    condition     = var.waf_rate_limit_per_ip >= 100 && var.waf_rate_limit_per_ip <= 2000000000
    error_message = "waf_rate_limit_per_ip must be between 100 and 2,000,000,000."
  }
}

# ---------------------------------------------------------------------------
# Container image
# ---------------------------------------------------------------------------

variable "image_tag" {
  description = "Tag of the API/jobs image in the ECR repository this module creates (e.g. the git commit sha). Tags are immutable: push a new tag for every build."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", var.image_tag))
    error_message = "image_tag must be a valid OCI tag (letters, digits, '_', '.', '-', at most 128 characters)."
  }
}

variable "container_image" {
  description = "Optional full image reference (registry/repository:tag or @digest) overriding <ECR repository>:<image_tag>. If it lives in another ECR repository, the execution roles need pull access to it."
  type        = string
  default     = null
}

variable "container_architecture" {
  description = "CPU architecture of the API/jobs image and Fargate tasks: X86_64 or ARM64 (Graviton, cheaper; build the image for linux/arm64)."
  type        = string
  default     = "X86_64"

  validation {
    condition     = contains(["X86_64", "ARM64"], var.container_architecture)
    error_message = "container_architecture must be X86_64 or ARM64."
  }
}

# ---------------------------------------------------------------------------
# API service (ECS Fargate)
# ---------------------------------------------------------------------------

variable "api_cpu" {
  description = "Fargate CPU units for one API task (256 = 0.25 vCPU)."
  type        = number
  default     = 512

  validation {
    condition     = contains([256, 512, 1024, 2048, 4096], var.api_cpu)
    error_message = "api_cpu must be one of 256, 512, 1024, 2048, 4096."
  }
}

variable "api_memory" {
  description = "Memory (MiB) for one API task; must be a valid Fargate combination with api_cpu."
  type        = number
  default     = 1024

  validation {
    condition     = var.api_memory >= 512 && var.api_memory <= 30720
    error_message = "api_memory must be between 512 and 30720 MiB."
  }
}

variable "api_min_capacity" {
  description = "Minimum number of API tasks (also the initial desired count). At least 2 so one task or zone can fail."
  type        = number
  default     = 2

  validation {
    condition     = var.api_min_capacity >= 1 && var.api_min_capacity <= 100
    error_message = "api_min_capacity must be between 1 and 100."
  }
}

variable "api_max_capacity" {
  description = "Maximum number of API tasks autoscaling may run. Note: the broker's rate limit is per task, so the effective limit grows with the task count."
  type        = number
  default     = 10

  validation {
    condition     = var.api_max_capacity >= 1 && var.api_max_capacity <= 100
    error_message = "api_max_capacity must be between 1 and 100."
  }
}

variable "api_cpu_target_percent" {
  description = "Target average CPU utilisation (%) for API autoscaling."
  type        = number
  default     = 60

  validation {
    condition     = var.api_cpu_target_percent >= 10 && var.api_cpu_target_percent <= 90
    error_message = "api_cpu_target_percent must be between 10 and 90."
  }
}

variable "api_requests_per_target" {
  description = "Target ALB requests per API task per minute (ALBRequestCountPerTarget) for autoscaling."
  type        = number
  default     = 3000

  validation {
    condition     = var.api_requests_per_target >= 10
    error_message = "api_requests_per_target must be at least 10."
  }
}

# ---------------------------------------------------------------------------
# Jobs (EventBridge Scheduler -> ECS RunTask `jobs run <job>`)
# ---------------------------------------------------------------------------

variable "jobs_cpu" {
  description = "Fargate CPU units for one job run."
  type        = number
  default     = 256

  validation {
    condition     = contains([256, 512, 1024, 2048, 4096], var.jobs_cpu)
    error_message = "jobs_cpu must be one of 256, 512, 1024, 2048, 4096."
  }
}

variable "jobs_memory" {
  description = "Memory (MiB) for one job run; must be a valid Fargate combination with jobs_cpu."
  type        = number
  default     = 512

  validation {
    condition     = var.jobs_memory >= 512 && var.jobs_memory <= 30720
    error_message = "jobs_memory must be between 512 and 30720 MiB."
  }
}

variable "job_schedules" {
  description = "Schedule expression per job (rate(...) or cron(...), see EventBridge Scheduler). Keys are the job names passed to `jobs run <job>`; remove a key to stop scheduling that job."
  type        = map(string)
  default = {
    "sync"         = "rate(10 minutes)"
    "cleanup"      = "rate(5 minutes)"
    "auto-expire"  = "rate(5 minutes)"
    "delete-stale" = "rate(1 hour)"
    "reservations" = "rate(5 minutes)"
    # The heartbeat reclaim acts only for tracks in heartbeat_tracks and with
    # write_events_heartbeats on; otherwise each run finds nothing to do.
    "reclaim-orphans" = "rate(1 minute)"
  }

  validation {
    condition     = alltrue([for k in keys(var.job_schedules) : contains(["sync", "cleanup", "auto-expire", "delete-stale", "reservations", "reclaim-orphans"], k)])
    error_message = "job_schedules keys must be among: sync, cleanup, auto-expire, delete-stale, reservations, reclaim-orphans."
  }

  validation {
    condition     = alltrue([for v in values(var.job_schedules) : can(regex("^(rate\\([1-9][0-9]* (minute|minutes|hour|hours|day|days)\\)|cron\\(.+\\))$", v))])
    error_message = "Each job schedule must be rate(<n> minutes|hours|days) or cron(<expression>)."
  }
}

variable "view_repair_schedule" {
  description = "Schedule of `projector verify --repair` (the view heals rows the stream lost); empty to disable."
  type        = string
  default     = "rate(1 hour)"

  validation {
    condition     = var.view_repair_schedule == "" || can(regex("^(rate\\([1-9][0-9]* (minute|minutes|hour|hours|day|days)\\)|cron\\(.+\\))$", var.view_repair_schedule))
    error_message = "view_repair_schedule must be empty, rate(<n> minutes|hours|days) or cron(<expression>)."
  }
}

variable "job_schedule_timezone" {
  description = "Time zone for cron() job schedules (IANA name)."
  type        = string
  default     = "UTC"
}

variable "jobs_enabled" {
  description = "Master switch for the job schedules (DISABLED keeps the schedules but stops runs, e.g. during an incident or a CSP outage)."
  type        = bool
  default     = true
}

variable "job_success_alarm_hours" {
  description = "Alarm when a scheduled job has not logged a successful run for this many consecutive hours. Must exceed the longest job interval."
  type        = number
  default     = 2

  validation {
    condition     = var.job_success_alarm_hours >= 1 && var.job_success_alarm_hours <= 24
    error_message = "job_success_alarm_hours must be between 1 and 24."
  }
}

# ---------------------------------------------------------------------------
# Projector (Lambda on the events table stream)
# ---------------------------------------------------------------------------

variable "projector_lambda_zip" {
  description = "Path to the projector Lambda package built by `cargo lambda build --release --x86-64 -p projector --bin projector-lambda` (use --arm64 with projector_architecture = arm64). Null means <repo>/target/lambda/projector-lambda/bootstrap.zip."
  type        = string
  default     = null
}

variable "projector_architecture" {
  description = "Lambda architecture of the projector: x86_64 (default) or arm64. arm64 (Graviton) is cheaper per GB-second; build the zip with `cargo lambda build --release --arm64 ...` to match."
  type        = string
  default     = "x86_64"

  validation {
    condition     = contains(["x86_64", "arm64"], var.projector_architecture)
    error_message = "projector_architecture must be x86_64 or arm64."
  }
}

variable "projector_memory_mb" {
  description = "Memory (MiB) of the projector Lambda (CPU scales with it)."
  type        = number
  default     = 256

  validation {
    condition     = var.projector_memory_mb >= 128 && var.projector_memory_mb <= 10240
    error_message = "projector_memory_mb must be between 128 and 10240."
  }
}

variable "projector_timeout_seconds" {
  description = "Timeout of one projector invocation (one batch)."
  type        = number
  default     = 60

  validation {
    condition     = var.projector_timeout_seconds >= 5 && var.projector_timeout_seconds <= 900
    error_message = "projector_timeout_seconds must be between 5 and 900."
  }
}

variable "projector_batch_size" {
  description = "Maximum stream records per projector invocation."
  type        = number
  default     = 100

  validation {
    condition     = var.projector_batch_size >= 1 && var.projector_batch_size <= 10000
    error_message = "projector_batch_size must be between 1 and 10000."
  }
}

variable "projector_batching_window_seconds" {
  description = "How long the event source mapping may wait to fill a batch. 0 keeps view lag lowest."
  type        = number
  default     = 0

  validation {
    condition     = var.projector_batching_window_seconds >= 0 && var.projector_batching_window_seconds <= 300
    error_message = "projector_batching_window_seconds must be between 0 and 300."
  }
}

variable "projector_parallelization_factor" {
  description = "Concurrent batches per stream shard (1-10). Order per aggregate is kept at any value because records with the same partition key (stream_id) always go to the same batch sequence."
  type        = number
  default     = 1

  validation {
    condition     = var.projector_parallelization_factor >= 1 && var.projector_parallelization_factor <= 10
    error_message = "projector_parallelization_factor must be between 1 and 10."
  }
}

variable "projector_max_retry_attempts" {
  description = "Retries of a failing batch (after bisection) before its records go to the on-failure queue; -1 (default) retries until the record is projector_max_record_age_seconds old, so a transient failure (throttling, an outage) never discards a record after a handful of tries."
  type        = number
  default     = -1

  validation {
    condition     = var.projector_max_retry_attempts >= -1 && var.projector_max_retry_attempts <= 10000
    error_message = "projector_max_retry_attempts must be -1 (bounded by record age) or between 0 and 10000."
  }
}

variable "projector_max_record_age_seconds" {
  description = "Records older than this are not retried but sent to the on-failure queue. Default: one day, the stream's retention, so a projector outage shorter than a day loses nothing."
  type        = number
  default     = 86400

  validation {
    condition     = var.projector_max_record_age_seconds >= 60 && var.projector_max_record_age_seconds <= 604800
    error_message = "projector_max_record_age_seconds must be between 60 and 604800."
  }
}

variable "projector_reserved_concurrency" {
  description = "Reserved concurrency of the projector Lambda. -1 means unreserved (default; new accounts often cannot reserve any). Set >= shard count x parallelization factor to guarantee capacity."
  type        = number
  default     = -1

  validation {
    condition     = var.projector_reserved_concurrency == -1 || var.projector_reserved_concurrency >= 1
    error_message = "projector_reserved_concurrency must be -1 (unreserved) or at least 1."
  }
}

# ---------------------------------------------------------------------------
# Application settings (environment of the containers)
# ---------------------------------------------------------------------------

variable "csp_base_url" {
  description = "Base URL of the Infoblox CSP API the jobs (and admin endpoints) call, e.g. https://csp.example.com/v2."
  type        = string

  validation {
    condition     = can(regex("^https://[^\\s]+$", var.csp_base_url))
    error_message = "csp_base_url must be an https:// URL."
  }
}

variable "csp_api_token" {
  description = "CSP API token. Ephemeral: written to Secrets Manager as a write-only value, never stored in state or plan. Supply it with TF_VAR_csp_api_token on every plan/apply; bump csp_api_token_version to store a new value."
  type        = string
  sensitive   = true
  ephemeral   = true

  validation {
    condition     = length(var.csp_api_token) >= 8
    error_message = "csp_api_token must be set (at least 8 characters)."
  }
}

variable "csp_api_token_version" {
  description = "Increment to write a new csp_api_token to Secrets Manager (write-only values are only sent when this changes). Restart the tasks afterwards (see docs/operations.md, Rotate a token)."
  type        = number
  default     = 1

  validation {
    condition     = var.csp_api_token_version >= 1 && floor(var.csp_api_token_version) == var.csp_api_token_version
    error_message = "csp_api_token_version must be a positive integer."
  }
}

variable "broker_api_token" {
  description = "Track token (BROKER_API_TOKEN) shared with the Instruqt tracks. Ephemeral and write-only. Null generates a random 48-character token; read it with `aws secretsmanager get-secret-value`."
  type        = string
  default     = null
  sensitive   = true
  ephemeral   = true

  validation {
    condition     = var.broker_api_token == null || length(coalesce(var.broker_api_token, "x")) >= 32
    error_message = "broker_api_token must be at least 32 characters (or null to generate one)."
  }
}

variable "broker_admin_token" {
  description = "Admin token (BROKER_ADMIN_TOKEN). Ephemeral and write-only. Null generates a random 48-character token."
  type        = string
  default     = null
  sensitive   = true
  ephemeral   = true

  validation {
    condition     = var.broker_admin_token == null || length(coalesce(var.broker_admin_token, "x")) >= 32
    error_message = "broker_admin_token must be at least 32 characters (or null to generate one)."
  }
}

variable "metrics_token" {
  description = "METRICS_TOKEN: the bearer token a /metrics scrape must send. Ephemeral and write-only. Null generates a random 48-character token; read it with `aws secretsmanager get-secret-value`."
  type        = string
  default     = null
  sensitive   = true
  ephemeral   = true

  validation {
    condition     = var.metrics_token == null || length(coalesce(var.metrics_token, "x")) >= 32
    error_message = "metrics_token must be at least 32 characters (or null to generate one)."
  }
}

variable "metrics_token_version" {
  description = "Increment to write a new metrics token (given or freshly generated) to Secrets Manager. Restart the API and update the scraper afterwards."
  type        = number
  default     = 1

  validation {
    condition     = var.metrics_token_version >= 1 && floor(var.metrics_token_version) == var.metrics_token_version
    error_message = "metrics_token_version must be a positive integer."
  }
}

variable "broker_tokens_version" {
  description = "Increment to write new broker tokens (given or freshly generated) to Secrets Manager, i.e. to rotate them. Restart the API afterwards and update the tracks."
  type        = number
  default     = 1

  validation {
    condition     = var.broker_tokens_version >= 1 && floor(var.broker_tokens_version) == var.broker_tokens_version
    error_message = "broker_tokens_version must be a positive integer."
  }
}

variable "lab_duration_hours" {
  description = "LAB_DURATION_HOURS: how long an allocation lasts before it may be expired."
  type        = number
  default     = 48

  validation {
    condition     = var.lab_duration_hours >= 1 && var.lab_duration_hours <= 720
    error_message = "lab_duration_hours must be between 1 and 720."
  }
}

variable "grace_period_minutes" {
  description = "GRACE_PERIOD_MINUTES: extra time after expiry before auto-expire acts."
  type        = number
  default     = 30

  validation {
    condition     = var.grace_period_minutes >= 0 && var.grace_period_minutes <= 1440
    error_message = "grace_period_minutes must be between 0 and 1440."
  }
}

variable "k_candidates" {
  description = "K_CANDIDATES: how many random available candidates one allocation reads from the view."
  type        = number
  default     = 15

  validation {
    condition     = var.k_candidates >= 1 && var.k_candidates <= 100
    error_message = "k_candidates must be between 1 and 100."
  }
}

variable "rate_limit_rps" {
  description = "RATE_LIMIT_RPS: sustained requests per second per caller key, per API task."
  type        = number
  default     = 50

  validation {
    condition     = var.rate_limit_rps >= 1
    error_message = "rate_limit_rps must be at least 1."
  }
}

variable "rate_limit_burst" {
  description = "RATE_LIMIT_BURST: burst size per caller key, per API task."
  type        = number
  default     = 200

  validation {
    condition     = var.rate_limit_burst >= 1
    error_message = "rate_limit_burst must be at least 1."
  }
}

variable "ready_max_lag_ms" {
  description = "READY_MAX_LAG_MS: /readyz reports not-ready when the projector lags more than this. (The ALB checks /healthz, not /readyz: see alb.tf.)"
  type        = number
  default     = 30000

  validation {
    condition     = var.ready_max_lag_ms >= 1000
    error_message = "ready_max_lag_ms must be at least 1000."
  }
}

variable "cors_allowed_origins" {
  description = "CORS_ALLOWED_ORIGINS: browser origins allowed to call the API (e.g. the admin dashboard's origin). Empty allows none."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for o in var.cors_allowed_origins : can(regex("^https?://[^\\s/,]+$", o))])
    error_message = "Each CORS origin must be scheme://host[:port] with no path and no comma."
  }
}

variable "view_index_shards" {
  description = "VIEW_INDEX_SHARDS: write shards of the hot index keys (by-time hours, by-due statuses). Given to API, projector and jobs alike; readers query every shard, so all must agree. After raising it from 1, run `projector rebuild` once (ADR 0014)."
  type        = number
  default     = 8

  validation {
    condition     = var.view_index_shards >= 1 && var.view_index_shards <= 64
    error_message = "view_index_shards must be between 1 and 64."
  }
}

variable "stats_shards" {
  description = "STATS_SHARDS: number of stats counter items. Given to API, projector and jobs alike; changing it on a populated system requires `projector rebuild`."
  type        = number
  default     = 8

  validation {
    condition     = var.stats_shards >= 1 && var.stats_shards <= 256
    error_message = "stats_shards must be between 1 and 256."
  }
}

variable "deletion_retry_max_attempts" {
  description = "DELETION_RETRY_MAX_ATTEMPTS: CSP delete attempts before a sandbox is quarantined as deletion_failed."
  type        = number
  default     = 5

  validation {
    condition     = var.deletion_retry_max_attempts >= 1 && var.deletion_retry_max_attempts <= 100
    error_message = "deletion_retry_max_attempts must be between 1 and 100."
  }
}

variable "circuit_breaker_threshold" {
  description = "CIRCUIT_BREAKER_THRESHOLD: consecutive CSP failures that open the circuit breaker (per process / per job run)."
  type        = number
  default     = 5

  validation {
    condition     = var.circuit_breaker_threshold >= 1
    error_message = "circuit_breaker_threshold must be at least 1."
  }
}

variable "circuit_breaker_timeout_sec" {
  description = "CIRCUIT_BREAKER_TIMEOUT_SEC: how long the breaker stays open before a trial call."
  type        = number
  default     = 60

  validation {
    condition     = var.circuit_breaker_timeout_sec >= 1
    error_message = "circuit_breaker_timeout_sec must be at least 1."
  }
}

variable "csp_timeout_connect_sec" {
  description = "CSP_TIMEOUT_CONNECT_SEC: connect timeout for CSP calls. Null leaves the code's default."
  type        = number
  default     = null

  validation {
    condition     = var.csp_timeout_connect_sec == null || coalesce(var.csp_timeout_connect_sec, 1) > 0
    error_message = "csp_timeout_connect_sec must be positive or null."
  }
}

variable "csp_timeout_read_sec" {
  description = "CSP_TIMEOUT_READ_SEC: read timeout for CSP calls. Null leaves the code's default."
  type        = number
  default     = null

  validation {
    condition     = var.csp_timeout_read_sec == null || coalesce(var.csp_timeout_read_sec, 1) > 0
    error_message = "csp_timeout_read_sec must be positive or null."
  }
}

variable "cleanup_concurrency" {
  description = "CLEANUP_CONCURRENCY: concurrent CSP deletes inside one cleanup run."
  type        = number
  default     = 4

  validation {
    condition     = var.cleanup_concurrency >= 1 && var.cleanup_concurrency <= 64
    error_message = "cleanup_concurrency must be between 1 and 64."
  }
}

variable "cleanup_per_sandbox_delay_sec" {
  description = "CLEANUP_PER_SANDBOX_DELAY_SEC: pause between CSP deletes (rate limiting toward CSP). Null leaves the code's default."
  type        = number
  default     = null

  validation {
    condition     = var.cleanup_per_sandbox_delay_sec == null || coalesce(var.cleanup_per_sandbox_delay_sec, 0) >= 0
    error_message = "cleanup_per_sandbox_delay_sec must be >= 0 or null."
  }
}

variable "stale_grace_hours" {
  description = "STALE_GRACE_HOURS: how long a sandbox stays stale before delete-stale retires it."
  type        = number
  default     = 24

  validation {
    condition     = var.stale_grace_hours >= 1
    error_message = "stale_grace_hours must be at least 1."
  }
}

variable "rust_log" {
  description = "RUST_LOG filter for every component (tracing EnvFilter syntax, e.g. info or info,domain=debug)."
  type        = string
  default     = "info"
}

# ---------------------------------------------------------------------------
# Operations: logs, alarms, notifications
# ---------------------------------------------------------------------------

variable "log_retention_days" {
  description = "Retention of every log group (API, jobs, projector, ops, VPC flow logs, WAF). The audit trail itself lives in the events table, not in logs."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a CloudWatch Logs retention value (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653)."
  }
}

variable "metrics_namespace" {
  description = "CloudWatch namespace of the metrics derived from the JSON logs."
  type        = string
  default     = "SandboxBroker"

  validation {
    condition     = can(regex("^[A-Za-z0-9_./#:-]{1,255}$", var.metrics_namespace)) && !startswith(var.metrics_namespace, "AWS/")
    error_message = "metrics_namespace must be 1-255 characters and must not start with AWS/."
  }
}

variable "alarm_notification_protocol" {
  description = "Protocol of the alarm topic subscription (email, https, sqs, lambda, sms...)."
  type        = string
  default     = "email"

  validation {
    condition     = contains(["email", "email-json", "http", "https", "sqs", "lambda", "sms", "application", "firehose"], var.alarm_notification_protocol)
    error_message = "alarm_notification_protocol must be a valid SNS protocol."
  }
}

variable "alarm_notification_endpoint" {
  description = "Where alarm notifications go (an address, URL or ARN matching alarm_notification_protocol). Null creates the topic without a subscription. Email subscriptions must be confirmed from the mailbox."
  type        = string
  default     = null
}

variable "slow_request_threshold_ms" {
  description = "A request slower than this (latency_ms in the access log) counts as slow."
  type        = number
  default     = 1000

  validation {
    condition     = var.slow_request_threshold_ms >= 10
    error_message = "slow_request_threshold_ms must be at least 10."
  }
}

variable "alarm_thresholds" {
  description = "Alarm thresholds. api_5xx/slow_requests/rate_limit_hits: count per 5 minutes; quota_exceeded: 429 QUOTA_EXCEEDED per 5 minutes; no_sandboxes: 409 NO_SANDBOXES_AVAILABLE per 5 minutes; csp_errors: per 15 minutes; job_failures: failed runs per 15 minutes; projector_lag_ms: view lag from the projector's logs; iterator_age_ms: Lambda IteratorAge."
  type = object({
    api_5xx          = optional(number, 5)
    no_sandboxes     = optional(number, 1)
    slow_requests    = optional(number, 25)
    rate_limit_hits  = optional(number, 100)
    quota_exceeded   = optional(number, 10)
    csp_errors       = optional(number, 10)
    job_failures     = optional(number, 1)
    projector_lag_ms = optional(number, 30000)
    iterator_age_ms  = optional(number, 60000)
  })
  default = {}

  validation {
    condition     = alltrue([for v in values(var.alarm_thresholds) : v >= 1])
    error_message = "Every alarm threshold must be at least 1."
  }
}

variable "webhooks_enabled" {
  description = "Store webhook subscribers (webhooks_json) in Secrets Manager and hand them to the API as the WEBHOOKS_JSON secret; the API then dispatches webhooks (docs/adr/0018)."
  type        = bool
  default     = false
}

variable "webhooks_json" {
  description = "WEBHOOKS_JSON of the API: {\"subscribers\": [...]} with each subscriber's HMAC secret (docs/clients.md, Webhooks). Ephemeral: written to Secrets Manager as a write-only value, never stored in state or plan. Supply it with TF_VAR_webhooks_json when webhooks_enabled; bump webhooks_json_version to store a new value."
  type        = string
  default     = null
  sensitive   = true
  ephemeral   = true

  validation {
    condition     = var.webhooks_json == null || can(jsondecode(var.webhooks_json).subscribers)
    error_message = "webhooks_json must be JSON with a subscribers list."
  }
}

variable "webhooks_json_version" {
  description = "Increment to write a new webhooks_json to Secrets Manager (write-only values are only sent when this changes). Restart the API tasks afterwards."
  type        = number
  default     = 1

  validation {
    condition     = var.webhooks_json_version >= 1 && floor(var.webhooks_json_version) == var.webhooks_json_version
    error_message = "webhooks_json_version must be a positive integer."
  }
}

variable "drain_alarm_hours" {
  description = "Hours a drain may stay in force before the pool-drained-long alarm fires."
  type        = number
  default     = 4

  validation {
    condition     = var.drain_alarm_hours >= 1 && var.drain_alarm_hours <= 24
    error_message = "drain_alarm_hours must be between 1 and 24."
  }
}

variable "pool_low_water" {
  description = "POOL_LOW_WATER of the API: available-sandbox thresholds per name prefix group, `prefix=count,...`, `default=count` for every other group; empty disables the pool-low-water alarm's source."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^\\s*$|^\\s*[^=,]+=[0-9]+\\s*(,\\s*[^=,]+=[0-9]+\\s*)*$", var.pool_low_water))
    error_message = "pool_low_water must be prefix=count pairs separated by commas."
  }
}

variable "backup_enabled" {
  description = "Back up the events table with AWS Backup (a vault, a daily plan, optionally a copy to another account/region). PITR stays on either way. See docs/restore.md."
  type        = bool
  default     = false
}

variable "backup_schedule" {
  description = "When the daily recovery point is taken (AWS Backup cron expression, UTC)."
  type        = string
  default     = "cron(0 3 * * ? *)"
}

variable "backup_retention_days" {
  description = "Days a recovery point is kept in this account's vault."
  type        = number
  default     = 35

  validation {
    condition     = var.backup_retention_days >= 1
    error_message = "backup_retention_days must be at least 1."
  }
}

variable "backup_copy_vault_arn" {
  description = "ARN of a backup vault in another account and/or region that receives a copy of every recovery point (null: no copy). The vault's access policy must allow this account backup:CopyIntoBackupVault."
  type        = string
  default     = null
}

variable "backup_copy_retention_days" {
  description = "Days a copied recovery point is kept in the destination vault."
  type        = number
  default     = 90

  validation {
    condition     = var.backup_copy_retention_days >= 1
    error_message = "backup_copy_retention_days must be at least 1."
  }
}
