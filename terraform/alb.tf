# Application Load Balancer: HTTPS only (HTTP answers with a permanent redirect),
# TLS 1.2+ policy, invalid headers dropped, health check on /healthz.

resource "aws_lb" "api" {
  #checkov:skip=CKV2_AWS_28:WAF is on by default (var.enable_waf, see waf.tf) and can be turned off; the broker has its own per-caller rate limiter and bearer-token auth on every route but the health checks.
  #checkov:skip=CKV2_AWS_76:WAF is on by default (var.enable_waf) and can be turned off; when enabled, the web ACL includes AWSManagedRulesKnownBadInputsRuleSet, the Log4j rule group (waf.tf). The API is Rust and does not use Log4j.
  #checkov:skip=CKV_AWS_91:Access logs are optional (var.alb_access_logs_bucket) because they need a separately managed S3 bucket; the API writes a JSON access-log line per request to CloudWatch regardless.
  name                       = "${var.name_prefix}-api"
  load_balancer_type         = "application"
  internal                   = var.alb_internal
  security_groups            = [aws_security_group.alb.id]
  subnets                    = var.alb_internal ? aws_subnet.private[*].id : aws_subnet.public[*].id
  drop_invalid_header_fields = true
  enable_deletion_protection = var.alb_deletion_protection
  idle_timeout               = var.alb_idle_timeout_seconds

  dynamic "access_logs" {
    for_each = var.alb_access_logs_bucket == null ? [] : [var.alb_access_logs_bucket]
    content {
      bucket  = access_logs.value
      prefix  = var.name_prefix
      enabled = true
    }
  }
}

resource "aws_lb_target_group" "api" {
  name        = "${var.name_prefix}-api"
  port        = 8080
  protocol    = "HTTP"
  target_type = "ip"
  vpc_id      = aws_vpc.main.id

  # Matches the API task's stopTimeout: in-flight requests finish on drain.
  deregistration_delay = 30

  # /healthz (liveness), deliberately not /readyz: readiness also fails when
  # the projector lags, and that lag is the same for every task, so an ALB
  # check on /readyz would pull ALL tasks at once and turn a stale view into a
  # full outage, although allocation still works on strong reads. Projector lag
  # has its own alarms (monitoring.tf).
  health_check {
    enabled             = true
    path                = "/healthz"
    matcher             = "200"
    protocol            = "HTTP"
    interval            = 15
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.api.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }
}

resource "aws_lb_listener" "http_redirect" {
  load_balancer_arn = aws_lb.api.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"

    redirect {
      protocol    = "HTTPS"
      port        = "443"
      status_code = "HTTP_301"
    }
  }
}

# Keep the Prometheus endpoint off the internet unless asked for.
resource "aws_lb_listener_rule" "hide_metrics" {
  count = var.expose_metrics_publicly ? 0 : 1

  listener_arn = aws_lb_listener.https.arn
  priority     = 10

  condition {
    path_pattern {
      values = ["/metrics", "/metrics/*"]
    }
  }

  action {
    type = "fixed-response"

    fixed_response {
      content_type = "application/json"
      status_code  = "404"
      message_body = "{\"detail\":{\"code\":\"NOT_FOUND\",\"message\":\"Not found\"}}"
    }
  }
}

resource "aws_route53_record" "api" {
  count = var.api_domain_name != null && var.route53_zone_id != null ? 1 : 0

  zone_id = var.route53_zone_id
  name    = var.api_domain_name
  type    = "A"

  alias {
    name                   = aws_lb.api.dns_name
    zone_id                = aws_lb.api.zone_id
    evaluate_target_health = true
  }
}
