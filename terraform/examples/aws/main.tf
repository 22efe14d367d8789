# An archive bucket for one PostgreSQL cluster whose database hosts run on EC2, plus instance
# profiles that hand the archiver role to the database hosts and the restorer role to restore hosts.

provider "aws" {
  region = var.region
}

module "walship_bucket" {
  source = "../../modules/walship-bucket"

  bucket_name = var.bucket_name
  key_prefix  = var.key_prefix

  # Nobody, the database host least of all, can delete an archived version within 14 days of its
  # upload; in GOVERNANCE mode an operator with s3:BypassGovernanceRetention still can.
  object_lock_enabled = true
  object_lock_mode    = "GOVERNANCE"
  object_lock_days    = 14

  # Deleted objects stay recoverable for 35 days (>= the 14 days of retention).
  noncurrent_version_expiration_days = 35

  # Base backups are read rarely: move them to STANDARD_IA after 30 days. WAL stays in STANDARD.
  transitions = {
    backups = { days = 30, storage_class = "STANDARD_IA" }
  }

  create_roles        = true
  archiver_principals = { services = ["ec2.amazonaws.com"] }
  restorer_principals = { services = ["ec2.amazonaws.com"] }

  walship_recipients = var.walship_recipients

  tags = {
    Project = "walship"
  }
}

# Attach these to the EC2 instances: the primary (and any host that may become primary) gets the
# archiver, restore hosts get the restorer.
resource "aws_iam_instance_profile" "archiver" {
  name = "${var.bucket_name}-archiver"
  role = module.walship_bucket.role_names["archiver"]
}

resource "aws_iam_instance_profile" "restorer" {
  name = "${var.bucket_name}-restorer"
  role = module.walship_bucket.role_names["restorer"]
}
