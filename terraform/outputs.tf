output "api_url" {
  description = "Base URL of the broker (the API lives under /v1). Use api_domain_name's DNS record, or the ALB name if none."
  value       = local.api_url
}

output "alb_dns_name" {
  description = "DNS name of the ALB; point a CNAME/alias for api_domain_name at it."
  value       = aws_lb.api.dns_name
}

output "alb_zone_id" {
  description = "Hosted zone id of the ALB, for a Route 53 alias record managed elsewhere."
  value       = aws_lb.api.zone_id
}

output "ecr_repository_url" {
  description = "Push the API/jobs image here as <url>:<image_tag>."
  value       = aws_ecr_repository.app.repository_url
}

output "container_image" {
  description = "Image reference the task definitions run."
  value       = local.container_image
}

output "table_names" {
  description = "DynamoDB table names by role."
  value = {
    events      = aws_dynamodb_table.events.name
    pool        = aws_dynamodb_table.pool.name
    stats       = aws_dynamodb_table.stats.name
    checkpoints = aws_dynamodb_table.checkpoints.name
  }
}

output "events_stream_arn" {
  description = "ARN of the events table's stream (NEW_IMAGE), for other consumers (analytics, dashboards)."
  value       = aws_dynamodb_table.events.stream_arn
}

output "projector_function_name" {
  description = "Name of the projector Lambda function."
  value       = aws_lambda_function.projector.function_name
}

output "projector_failure_queue_url" {
  description = "SQS queue receiving the stream batches the projector gave up on (re-apply them with `projector redrive`)."
  value       = aws_sqs_queue.projector_failures.url
}

output "ecs_cluster_name" {
  description = "ECS cluster running the API service and the job/ops tasks."
  value       = aws_ecs_cluster.main.name
}

output "api_service_name" {
  description = "ECS service of the API (force a new deployment after rotating a secret)."
  value       = aws_ecs_service.api.name
}

output "jobs_task_definition_arn" {
  description = "Task definition the job schedules run."
  value       = aws_ecs_task_definition.jobs.arn
}

output "job_schedule_names" {
  description = "EventBridge Scheduler schedules, by job."
  value       = { for k, s in aws_scheduler_schedule.job : k => s.name }
}

output "secret_arns" {
  description = "Secrets Manager ARNs of the tokens (values are never output). Read the generated track token with: aws secretsmanager get-secret-value --secret-id <arn> --query SecretString --output text"
  value = {
    broker_api_token   = aws_secretsmanager_secret.broker_api_token.arn
    broker_admin_token = aws_secretsmanager_secret.broker_admin_token.arn
    csp_api_token      = aws_secretsmanager_secret.csp_api_token.arn
  }
}

output "alarm_topic_arn" {
  description = "SNS topic receiving every alarm and ECS failure event; add subscriptions here."
  value       = aws_sns_topic.alarms.arn
}

output "dashboard_name" {
  description = "CloudWatch dashboard for the pool and the projector."
  value       = aws_cloudwatch_dashboard.main.dashboard_name
}

output "log_group_names" {
  description = "Log groups of the components."
  value = {
    api       = aws_cloudwatch_log_group.api.name
    jobs      = aws_cloudwatch_log_group.jobs.name
    projector = aws_cloudwatch_log_group.projector.name
    ops       = aws_cloudwatch_log_group.ops.name
  }
}

output "private_subnet_ids" {
  description = "Private subnets (for one-off tasks)."
  value       = aws_subnet.private[*].id
}

output "tasks_security_group_id" {
  description = "Security group for one-off tasks (jobs, ops)."
  value       = aws_security_group.tasks.id
}

locals {
  run_task_network = "awsvpcConfiguration={subnets=[${join(",", aws_subnet.private[*].id)}],securityGroups=[${aws_security_group.tasks.id}],assignPublicIp=DISABLED}"
}

output "job_run_task_command" {
  description = "Run a job by hand (replace sync with cleanup, auto-expire or delete-stale). Safe while scheduled runs are in flight (ADR 0004)."
  value       = "aws ecs run-task --region ${var.aws_region} --cluster ${aws_ecs_cluster.main.name} --launch-type FARGATE --task-definition ${aws_ecs_task_definition.jobs.family} --network-configuration '${local.run_task_network}' --overrides '{\"containerOverrides\":[{\"name\":\"jobs\",\"command\":[\"/usr/local/bin/jobs\",\"run\",\"sync\"]}]}'"
}

output "ops_run_task_command" {
  description = "Run `projector verify` by hand; change verify to rebuild to rebuild the view from the events."
  value       = "aws ecs run-task --region ${var.aws_region} --cluster ${aws_ecs_cluster.main.name} --launch-type FARGATE --task-definition ${aws_ecs_task_definition.ops.family} --network-configuration '${local.run_task_network}' --overrides '{\"containerOverrides\":[{\"name\":\"ops\",\"command\":[\"/usr/local/bin/projector\",\"verify\"]}]}'"
}

output "backup_vault_name" {
  description = "The AWS Backup vault holding the events table's recovery points (null unless backup_enabled)."
  value       = var.backup_enabled ? aws_backup_vault.events[0].name : null
}
