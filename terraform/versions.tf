# Terraform and provider requirements.
#
# Terraform >= 1.11 because the secrets are written with write-only arguments
# (`secret_string_wo`) from ephemeral values: the CSP token and the broker tokens
# reach Secrets Manager without ever being stored in the Terraform state or plan.
terraform {
  required_version = ">= 1.11.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.0, < 7.0"
    }
    random = {
      # >= 3.7 for the ephemeral `random_password` resource.
      source  = "hashicorp/random"
      version = ">= 3.7, < 4.0"
    }
  }

  # State holds ARNs, subnet ids and the like (no secret values, see secrets.tf),
  # but keep it in an encrypted, locked remote backend all the same. Example:
  #
  # backend "s3" {
  #   bucket       = "<your-state-bucket>"
  #   key          = "sandbox-broker/terraform.tfstate"
  #   region       = "<your-region>"
  #   encrypt      = true
  #   use_lockfile = true
  # }
}
