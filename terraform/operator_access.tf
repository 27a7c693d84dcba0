# Operator-only paths: the admin API, the dashboard, the API docs and the OpenAPI document
# answer only to var.operator_cidrs at the load balancer, before any request reaches a task.
# The admin token still guards the admin API; this keeps token guessing, and the map of the
# API (the docs page and /v1/openapi.json, which the docs page loads), off the internet.
#
# An ALB rule cannot say "path P and source NOT in C", so there are two layers: allow rules
# (path and source ip) forward, and one lower-priority rule answers 403 for the same paths. An
# ALB rule holds at most five condition values, so each allow rule pairs one path pattern with
# at most four CIDRs; a long CIDR list becomes several rules.

locals {
  # The deny rule lists every pattern in one condition: at most five values (an ALB limit).
  operator_path_patterns = ["/v1/admin*", "/dashboard*", "/v1/docs*", "/v1/openapi.json"]
  operator_cidr_chunks   = chunklist(var.operator_cidrs, 4)
  operator_allow_rules = {
    for pair in setproduct(range(length(local.operator_path_patterns)), range(length(local.operator_cidr_chunks))) :
    "${pair[0]}-${pair[1]}" => {
      path  = local.operator_path_patterns[pair[0]]
      cidrs = local.operator_cidr_chunks[pair[1]]
      # 20.. for the allow rules; the deny rule sits after all of them.
      priority = 20 + pair[0] * length(local.operator_cidr_chunks) + pair[1]
    }
  }
}

resource "aws_lb_listener_rule" "operator_allow" {
  for_each = local.operator_allow_rules

  listener_arn = aws_lb_listener.https.arn
  priority     = each.value.priority

  condition {
    path_pattern {
      values = [each.value.path]
    }
  }

  condition {
    source_ip {
      values = each.value.cidrs
    }
  }

  action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }
}

resource "aws_lb_listener_rule" "operator_deny" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 1000

  condition {
    path_pattern {
      values = local.operator_path_patterns
    }
  }

  action {
    type = "fixed-response"

    fixed_response {
      content_type = "application/json"
      status_code  = "403"
      message_body = "{\"detail\":{\"code\":\"FORBIDDEN\",\"message\":\"Operator paths are reachable from the operator network only\"}}"
    }
  }
}
