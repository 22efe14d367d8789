terraform {
  # 1.5 for strcontains(); optional object attributes with defaults need 1.3. OpenTofu >= 1.6 too.
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # v5 split the bucket settings into the aws_s3_bucket_* resources used here.
      version = ">= 5.0, < 7.0"
    }
  }
}
