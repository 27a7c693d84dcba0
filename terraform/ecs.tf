# ECS Fargate: the API as a service behind the ALB; the jobs and the projector
# CLI as task definitions that are only ever started as one-off tasks (the jobs
# by EventBridge Scheduler, see jobs.tf; the ops task by an operator).

resource "aws_ecs_cluster" "main" {
  name = var.name_prefix

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_ecs_cluster_capacity_providers" "main" {
  cluster_name       = aws_ecs_cluster.main.name
  capacity_providers = ["FARGATE"]

  default_capacity_provider_strategy {
    capacity_provider = "FARGATE"
    weight            = 1
  }
}

locals {
  # Container settings common to every task: a read-only root filesystem (the
  # binaries write nothing locally in DynamoDB mode), an init process to reap
  # children and forward SIGTERM, JSON logs to CloudWatch.
  container_common = {
    image                  = local.container_image
    essential              = true
    readonlyRootFilesystem = true
    linuxParameters = {
      initProcessEnabled = true
    }
    ulimits = [
      { name = "nofile", softLimit = 65536, hardLimit = 65536 }
    ]
  }

  ecs_log_options = {
    "awslogs-region" = var.aws_region
    "mode"           = "non-blocking"
    # A log burst must never block the request path.
    "max-buffer-size" = "25m"
  }
}

# ---------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------

resource "aws_ecs_task_definition" "api" {
  family                   = "${var.name_prefix}-api"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = tostring(var.api_cpu)
  memory                   = tostring(var.api_memory)
  execution_role_arn       = aws_iam_role.execution["api"].arn
  task_role_arn            = aws_iam_role.api.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.container_architecture
  }

  container_definitions = jsonencode([
    merge(local.container_common, {
      name         = "api"
      command      = ["/usr/local/bin/command-api"]
      portMappings = [{ containerPort = 8080, protocol = "tcp", name = "http" }]
      environment  = [for k in sort(keys(local.api_env)) : { name = k, value = local.api_env[k] }]
      secrets      = [for k in sort(keys(local.api_secrets)) : { name = k, valueFrom = local.api_secrets[k] }]
      # The ALB drains a task for 30 s (deregistration delay); give the server
      # the same to finish in-flight requests after SIGTERM.
      stopTimeout = 30
      logConfiguration = {
        logDriver = "awslogs"
        options = merge(local.ecs_log_options, {
          "awslogs-group"         = aws_cloudwatch_log_group.api.name
          "awslogs-stream-prefix" = "api"
        })
      }
    })
  ])

  # The secret values must exist before a task can start.
  depends_on = [
    aws_secretsmanager_secret_version.broker_api_token,
    aws_secretsmanager_secret_version.broker_admin_token,
    aws_secretsmanager_secret_version.csp_api_token,
    aws_secretsmanager_secret_version.webhooks,
    aws_secretsmanager_secret_version.lease_token_key,
    aws_secretsmanager_secret_version.track_credentials,
    aws_secretsmanager_secret_version.lease_token_key_previous,
    aws_secretsmanager_secret_version.pseudonym_key,
  ]
}

resource "aws_ecs_service" "api" {
  name             = "${var.name_prefix}-api"
  cluster          = aws_ecs_cluster.main.id
  task_definition  = aws_ecs_task_definition.api.arn
  desired_count    = var.api_min_capacity
  launch_type      = "FARGATE"
  platform_version = "LATEST"

  # Rolling deployment that never drops below the current capacity, and rolls
  # back by itself if the new tasks do not become healthy.
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  health_check_grace_period_seconds  = 30
  enable_execute_command             = false
  propagate_tags                     = "SERVICE"
  enable_ecs_managed_tags            = true

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = aws_subnet.private[*].id
    security_groups  = [aws_security_group.api.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.api.arn
    container_name   = "api"
    container_port   = 8080
  }

  lifecycle {
    # Autoscaling owns the running count after creation.
    ignore_changes = [desired_count]
  }

  depends_on = [aws_lb_listener.https]
}

resource "aws_appautoscaling_target" "api" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.main.name}/${aws_ecs_service.api.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.api_min_capacity
  max_capacity       = var.api_max_capacity

  lifecycle {
    precondition {
      condition     = var.api_min_capacity <= var.api_max_capacity
      error_message = "api_min_capacity must not exceed api_max_capacity."
    }
  }
}

# Two target-tracking policies: ECS scales out when either asks for more
# tasks and scales in only when both allow it.
resource "aws_appautoscaling_policy" "api_cpu" {
  name               = "${var.name_prefix}-api-cpu"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.api.service_namespace
  resource_id        = aws_appautoscaling_target.api.resource_id
  scalable_dimension = aws_appautoscaling_target.api.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = var.api_cpu_target_percent
    scale_in_cooldown  = 300
    scale_out_cooldown = 60

    predefined_metric_specification {
      predefined_metric_type = "ECSServiceAverageCPUUtilization"
    }
  }
}

resource "aws_appautoscaling_policy" "api_requests" {
  name               = "${var.name_prefix}-api-requests"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.api.service_namespace
  resource_id        = aws_appautoscaling_target.api.resource_id
  scalable_dimension = aws_appautoscaling_target.api.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = var.api_requests_per_target
    scale_in_cooldown  = 300
    scale_out_cooldown = 60

    predefined_metric_specification {
      predefined_metric_type = "ALBRequestCountPerTarget"
      resource_label         = "${aws_lb.api.arn_suffix}/${aws_lb_target_group.api.arn_suffix}"
    }
  }
}

# ---------------------------------------------------------------------------
# Jobs: `jobs run <job>`; the schedule supplies the command (jobs.tf).
# ---------------------------------------------------------------------------

resource "aws_ecs_task_definition" "jobs" {
  family                   = "${var.name_prefix}-jobs"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = tostring(var.jobs_cpu)
  memory                   = tostring(var.jobs_memory)
  execution_role_arn       = aws_iam_role.execution["jobs"].arn
  task_role_arn            = aws_iam_role.jobs.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.container_architecture
  }

  container_definitions = jsonencode([
    merge(local.container_common, {
      name        = "jobs"
      command     = ["/usr/local/bin/jobs", "run", "sync"]
      environment = [for k in sort(keys(local.jobs_env)) : { name = k, value = local.jobs_env[k] }]
      secrets     = [for k in sort(keys(local.jobs_secrets)) : { name = k, valueFrom = local.jobs_secrets[k] }]
      stopTimeout = 60
      logConfiguration = {
        logDriver = "awslogs"
        options = merge(local.ecs_log_options, {
          "awslogs-group"         = aws_cloudwatch_log_group.jobs.name
          "awslogs-stream-prefix" = "jobs"
        })
      }
    })
  ])

  depends_on = [aws_secretsmanager_secret_version.csp_api_token]
}

# ---------------------------------------------------------------------------
# Ops: `projector verify` (default) or `projector rebuild`, started by hand
# (see the ops_run_task_command output).
# ---------------------------------------------------------------------------

resource "aws_ecs_task_definition" "ops" {
  family                   = "${var.name_prefix}-ops"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = "512"
  memory                   = "1024"
  execution_role_arn       = aws_iam_role.execution["ops"].arn
  task_role_arn            = aws_iam_role.ops.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.container_architecture
  }

  container_definitions = jsonencode([
    merge(local.container_common, {
      name        = "ops"
      command     = ["/usr/local/bin/projector", "verify"]
      environment = [for k in sort(keys(local.ops_env)) : { name = k, value = local.ops_env[k] }]
      logConfiguration = {
        logDriver = "awslogs"
        options = merge(local.ecs_log_options, {
          "awslogs-group"         = aws_cloudwatch_log_group.ops.name
          "awslogs-stream-prefix" = "ops"
        })
      }
    })
  ])
}
