# A dedicated VPC: public subnets hold only the ALB and the NAT gateway(s);
# every task and the projector Lambda run in private subnets with no public IP.
# DynamoDB traffic goes through a gateway endpoint (free, stays on the AWS
# network, and its policy only admits this deployment's tables).

resource "aws_vpc" "main" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true

  tags = {
    Name = var.name_prefix
  }
}

# Lock down the VPC's default security group: nothing may use it by accident.
resource "aws_default_security_group" "main" {
  vpc_id = aws_vpc.main.id

  tags = {
    Name = "${var.name_prefix}-default-unused"
  }
}

resource "aws_internet_gateway" "main" {
  vpc_id = aws_vpc.main.id

  tags = {
    Name = var.name_prefix
  }
}

resource "aws_subnet" "public" {
  count = var.az_count

  vpc_id            = aws_vpc.main.id
  availability_zone = local.azs[count.index]
  cidr_block        = cidrsubnet(var.vpc_cidr, 8, count.index)
  # Nothing launched here needs an automatic public IP: the ALB and NAT
  # gateways get theirs explicitly.
  map_public_ip_on_launch = false

  tags = {
    Name = "${var.name_prefix}-public-${local.azs[count.index]}"
    Tier = "public"
  }
}

resource "aws_subnet" "private" {
  count = var.az_count

  vpc_id                  = aws_vpc.main.id
  availability_zone       = local.azs[count.index]
  cidr_block              = cidrsubnet(var.vpc_cidr, 4, count.index + 1)
  map_public_ip_on_launch = false

  tags = {
    Name = "${var.name_prefix}-private-${local.azs[count.index]}"
    Tier = "private"
  }
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.main.id

  tags = {
    Name = "${var.name_prefix}-public"
  }
}

resource "aws_route" "public_internet" {
  route_table_id         = aws_route_table.public.id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.main.id
}

resource "aws_route_table_association" "public" {
  count = var.az_count

  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public.id
}

locals {
  nat_count = var.nat_gateway_per_az ? var.az_count : 1
}

resource "aws_eip" "nat" {
  count = local.nat_count

  domain = "vpc"

  tags = {
    Name = "${var.name_prefix}-nat-${count.index}"
  }

  depends_on = [aws_internet_gateway.main]
}

resource "aws_nat_gateway" "main" {
  count = local.nat_count

  allocation_id = aws_eip.nat[count.index].id
  subnet_id     = aws_subnet.public[count.index].id

  tags = {
    Name = "${var.name_prefix}-${local.azs[count.index]}"
  }

  depends_on = [aws_internet_gateway.main]
}

# One private route table per AZ, so the per-AZ NAT option only changes the
# route target.
resource "aws_route_table" "private" {
  count = var.az_count

  vpc_id = aws_vpc.main.id

  tags = {
    Name = "${var.name_prefix}-private-${local.azs[count.index]}"
  }
}

resource "aws_route" "private_nat" {
  count = var.az_count

  route_table_id         = aws_route_table.private[count.index].id
  destination_cidr_block = "0.0.0.0/0"
  nat_gateway_id         = aws_nat_gateway.main[var.nat_gateway_per_az ? count.index : 0].id
}

resource "aws_route_table_association" "private" {
  count = var.az_count

  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private[count.index].id
}

# DynamoDB gateway endpoint. The service name is built from the region
# variable (the reference hard-coded one region's endpoint while defaulting to
# another).
resource "aws_vpc_endpoint" "dynamodb" {
  vpc_id            = aws_vpc.main.id
  service_name      = "com.amazonaws.${var.aws_region}.dynamodb"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = aws_route_table.private[*].id
  policy            = data.aws_iam_policy_document.dynamodb_endpoint.json

  tags = {
    Name = "${var.name_prefix}-dynamodb"
  }
}

# Optional (var.s3_gateway_endpoint): ECR image layers come from S3; through a
# gateway endpoint they skip the NAT gateway's per-GB processing charge. Free.
resource "aws_vpc_endpoint" "s3" {
  count = var.s3_gateway_endpoint ? 1 : 0

  vpc_id            = aws_vpc.main.id
  service_name      = "com.amazonaws.${var.aws_region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = aws_route_table.private[*].id

  tags = {
    Name = "${var.name_prefix}-s3"
  }
}

# Second fence behind IAM: through this endpoint only this account's
# "<table_prefix>-*" tables (with their indexes and streams) are reachable, so
# credentials used from inside the VPC cannot copy data to another table.
data "aws_iam_policy_document" "dynamodb_endpoint" {
  statement {
    sid     = "OnlyThisDeploymentsTables"
    actions = ["dynamodb:*"]
    resources = [
      "arn:${local.partition}:dynamodb:${var.aws_region}:${local.account_id}:table/${var.table_prefix}-*",
    ]

    principals {
      type        = "AWS"
      identifiers = ["*"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:PrincipalAccount"
      values   = [local.account_id]
    }
  }
}

# VPC flow logs (rejected and accepted traffic) for incident forensics.
resource "aws_flow_log" "main" {
  vpc_id               = aws_vpc.main.id
  traffic_type         = "ALL"
  log_destination_type = "cloud-watch-logs"
  log_destination      = aws_cloudwatch_log_group.flow_logs.arn
  iam_role_arn         = aws_iam_role.flow_logs.arn
}

# ---------------------------------------------------------------------------
# Security groups. Rules are separate resources so the ALB <-> API references
# do not form a cycle.
# ---------------------------------------------------------------------------

resource "aws_security_group" "alb" {
  name        = "${var.name_prefix}-alb"
  description = "ALB: HTTPS (and HTTP for the redirect) from the allowed CIDRs; forwards to the API tasks only"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${var.name_prefix}-alb"
  }
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  for_each = toset(var.alb_ingress_cidrs)

  security_group_id = aws_security_group.alb.id
  description       = "HTTPS from allowed clients"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_ingress_rule" "alb_http" {
  #checkov:skip=CKV_AWS_260:Port 80 only serves the listener's permanent redirect to HTTPS (aws_lb_listener.http_redirect); no request is forwarded to the API over plain HTTP. Track scripts and browsers that start at http:// still land on HTTPS.
  for_each = toset(var.alb_ingress_cidrs)

  security_group_id = aws_security_group.alb.id
  description       = "HTTP from allowed clients, answered only with a redirect to HTTPS"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
}

resource "aws_vpc_security_group_egress_rule" "alb_to_api" {
  security_group_id            = aws_security_group.alb.id
  description                  = "To the API tasks"
  referenced_security_group_id = aws_security_group.api.id
  ip_protocol                  = "tcp"
  from_port                    = 8080
  to_port                      = 8080
}

resource "aws_security_group" "api" {
  name        = "${var.name_prefix}-api"
  description = "API tasks: port 8080 from the ALB only; HTTPS out (DynamoDB endpoint, CSP API, AWS APIs via NAT)"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${var.name_prefix}-api"
  }
}

resource "aws_vpc_security_group_ingress_rule" "api_from_alb" {
  security_group_id            = aws_security_group.api.id
  description                  = "From the ALB"
  referenced_security_group_id = aws_security_group.alb.id
  ip_protocol                  = "tcp"
  from_port                    = 8080
  to_port                      = 8080
}

resource "aws_vpc_security_group_egress_rule" "api_https" {
  security_group_id = aws_security_group.api.id
  description       = "HTTPS to the CSP API and AWS APIs (ECR, Secrets Manager, CloudWatch Logs) through NAT"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_egress_rule" "api_dynamodb" {
  security_group_id = aws_security_group.api.id
  description       = "HTTPS to DynamoDB through the gateway endpoint"
  prefix_list_id    = aws_vpc_endpoint.dynamodb.prefix_list_id
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_security_group" "tasks" {
  #checkov:skip=CKV2_AWS_5:Attached at run time: EventBridge Scheduler passes it in the RunTask network configuration of every job (aws_scheduler_schedule.job), and operators pass it to one-off ops tasks; checkov does not follow scheduler targets.
  name        = "${var.name_prefix}-tasks"
  description = "One-shot tasks (jobs, projector ops): no ingress; HTTPS out (DynamoDB endpoint, CSP API, AWS APIs via NAT)"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${var.name_prefix}-tasks"
  }
}

resource "aws_vpc_security_group_egress_rule" "tasks_https" {
  security_group_id = aws_security_group.tasks.id
  description       = "HTTPS to the CSP API and AWS APIs (ECR, Secrets Manager, CloudWatch Logs) through NAT"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_egress_rule" "tasks_dynamodb" {
  security_group_id = aws_security_group.tasks.id
  description       = "HTTPS to DynamoDB through the gateway endpoint"
  prefix_list_id    = aws_vpc_endpoint.dynamodb.prefix_list_id
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# The projector Lambda only ever talks to DynamoDB: its security group allows
# nothing but HTTPS to the DynamoDB endpoint's prefix list, so even a
# compromised function cannot reach the internet. (Stream records are pushed to
# it by the Lambda service, and its logs are shipped by the Lambda service.)
resource "aws_security_group" "projector" {
  name        = "${var.name_prefix}-projector"
  description = "Projector Lambda: no ingress; HTTPS to the DynamoDB gateway endpoint only"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${var.name_prefix}-projector"
  }
}

resource "aws_vpc_security_group_egress_rule" "projector_dynamodb" {
  security_group_id = aws_security_group.projector.id
  description       = "HTTPS to DynamoDB through the gateway endpoint"
  prefix_list_id    = aws_vpc_endpoint.dynamodb.prefix_list_id
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}
