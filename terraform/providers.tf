provider "aws" {
  # The region is a variable with no default: nothing in this configuration
  # hard-codes a region (the reference deployment hard-coded one in an endpoint
  # service name while defaulting to another).
  region = var.aws_region

  default_tags {
    tags = merge(
      {
        Project   = "sandbox-broker"
        Component = "sandbox-broker"
        ManagedBy = "terraform"
      },
      var.tags,
    )
  }
}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

# Zones are chosen by name order (the first az_count, see locals.tf) or pinned
# with var.availability_zones, so a zone AWS adds later cannot change the
# selection on its own: new zones get later letters and sort after the ones in
# use, and the subnets' zones are fixed once created.
data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:The result is narrowed deterministically by local.azs (first az_count zones in name order, or the explicit var.availability_zones), so a newly added zone does not change which zones are used.
  state = "available"

  filter {
    name   = "opt-in-status"
    values = ["opt-in-not-required"]
  }
}
