# A walship archive bucket on a self-hosted MinIO: versioned, optionally object-locked, with a
# lifecycle rule for noncurrent versions and a least-privilege MinIO user for the database host.
#
# The provider reads the MinIO admin credentials from MINIO_USER and MINIO_PASSWORD in the
# environment: keep them out of files.

terraform {
  required_version = ">= 1.5"

  required_providers {
    minio = {
      source  = "aminueza/minio"
      version = "~> 3.3"
    }
  }
}

variable "minio_server" {
  description = "host:port of the MinIO S3 API."
  type        = string
  default     = "minio.internal:9000"
}

variable "minio_ssl" {
  description = "Talk TLS to MinIO. Keep it on: walship's traffic is encrypted by age, its credentials are not."
  type        = bool
  default     = true
}

variable "minio_region" {
  description = "The MinIO server's region (MINIO_SITE_REGION; us-east-1 unless set)."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "Name of the archive bucket."
  type        = string
  default     = "walship"
}

variable "key_prefix" {
  description = "Repository prefix inside the bucket, e.g. \"pg/main\"."
  type        = string
  default     = "pg/main"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*/?$", var.key_prefix))
    error_message = "key_prefix must be '/'-separated names of letters, digits, '_', '-', '.' and '=', e.g. \"pg/main\"."
  }
}

variable "object_lock_enabled" {
  description = "Create the bucket with object locking and a default retention (only possible at creation)."
  type        = bool
  default     = false
}

variable "object_lock_mode" {
  description = "GOVERNANCE or COMPLIANCE."
  type        = string
  default     = "GOVERNANCE"

  validation {
    condition     = contains(["GOVERNANCE", "COMPLIANCE"], var.object_lock_mode)
    error_message = "object_lock_mode must be \"GOVERNANCE\" or \"COMPLIANCE\"."
  }
}

variable "object_lock_days" {
  description = "Default retention in days."
  type        = number
  default     = 30
}

variable "noncurrent_version_expiration_days" {
  description = "Days a deleted or overwritten version stays recoverable. With object lock, >= object_lock_days."
  type        = number
  default     = 90

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be >= 1."
  }
}

variable "walship_recipients" {
  description = "age public keys (from `walship keygen`) for the configuration snippet."
  type        = list(string)
  default     = []
}

provider "minio" {
  minio_server = var.minio_server
  minio_ssl    = var.minio_ssl
  minio_region = var.minio_region
}

locals {
  prefix      = "${trimsuffix(var.key_prefix, "/")}/"
  bucket_arn  = "arn:aws:s3:::${minio_s3_bucket.archive.bucket}"
  objects_arn = "arn:aws:s3:::${minio_s3_bucket.archive.bucket}/${local.prefix}*"
  endpoint    = "${var.minio_ssl ? "https" : "http"}://${var.minio_server}"

  # The archiver's actions: the same set as the AWS module's archiver policy (plus s3:HeadBucket,
  # which MinIO checks for HEAD bucket before falling back to s3:ListBucket). No delete, no
  # version delete, no bucket settings, no retention changes.
  archiver_actions = {
    list    = ["s3:ListBucket"]
    bucket  = ["s3:HeadBucket", "s3:GetBucketLocation", "s3:GetBucketVersioning", "s3:GetBucketObjectLockConfiguration"]
    objects = ["s3:GetObject", "s3:PutObject"]
  }
}

resource "minio_s3_bucket" "archive" {
  bucket         = var.bucket_name
  acl            = "private"
  object_locking = var.object_lock_enabled
  # Never delete archived WAL or backups with the Terraform resource.
  force_destroy = false

  lifecycle {
    precondition {
      condition     = !var.object_lock_enabled || var.noncurrent_version_expiration_days >= var.object_lock_days
      error_message = "noncurrent_version_expiration_days must be >= object_lock_days: a version cannot be removed before its retention ends."
    }
  }
}

resource "minio_s3_bucket_versioning" "archive" {
  bucket = minio_s3_bucket.archive.bucket

  versioning_configuration {
    status = "Enabled"
  }
}

resource "minio_s3_bucket_retention" "archive" {
  count = var.object_lock_enabled ? 1 : 0

  bucket          = minio_s3_bucket.archive.bucket
  mode            = var.object_lock_mode
  unit            = "DAYS"
  validity_period = var.object_lock_days

  depends_on = [minio_s3_bucket_versioning.archive]
}

resource "minio_ilm_policy" "archive" {
  bucket = minio_s3_bucket.archive.bucket

  # Deleted (or overwritten) versions stay recoverable this long; delete markers with nothing
  # behind them are then removed.
  rule {
    id         = "expire-noncurrent-versions"
    expiration = "DeleteMarker"

    noncurrent_expiration {
      days = "${var.noncurrent_version_expiration_days}d"
    }
  }

  depends_on = [minio_s3_bucket_versioning.archive]
}

resource "minio_iam_policy" "archiver" {
  name = "${var.bucket_name}-archiver"
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "ListRepository"
        Effect    = "Allow"
        Action    = local.archiver_actions.list
        Resource  = [local.bucket_arn]
        Condition = { StringLike = { "s3:prefix" = ["${local.prefix}*"] } }
      },
      {
        Sid      = "ReadBucketSettings"
        Effect   = "Allow"
        Action   = local.archiver_actions.bucket
        Resource = [local.bucket_arn]
      },
      {
        Sid      = "ReadAndCreateObjects"
        Effect   = "Allow"
        Action   = local.archiver_actions.objects
        Resource = [local.objects_arn]
      },
    ]
  })
}

# The database host's identity. Its access key is the user name; the provider generates the secret,
# which is therefore in the Terraform state: keep the state private.
resource "minio_iam_user" "archiver" {
  name = "${var.bucket_name}-archiver"
}

resource "minio_iam_user_policy_attachment" "archiver" {
  user_name   = minio_iam_user.archiver.name
  policy_name = minio_iam_policy.archiver.name
}

output "bucket_name" {
  description = "The archive bucket."
  value       = minio_s3_bucket.archive.bucket
}

output "archiver_access_key_id" {
  description = "Access key of the archiver user (s3.access_key_id)."
  value       = minio_iam_user.archiver.name
}

output "archiver_secret_access_key" {
  description = "Secret of the archiver user: terraform output -raw archiver_secret_access_key > /etc/walship/s3-secret (mode 0600)."
  value       = minio_iam_user.archiver.secret
  sensitive   = true
}

output "walship_config" {
  description = "Paste into /etc/walship/walship.toml on the database host: terraform output -raw walship_config"
  value = join("\n", [
    "# walship configuration for s3://${minio_s3_bucket.archive.bucket}/${trimsuffix(local.prefix, "/")} on MinIO",
    "repo = ${jsonencode("s3://${minio_s3_bucket.archive.bucket}/${trimsuffix(local.prefix, "/")}")}",
    length(var.walship_recipients) > 0
    ? "recipients = [${join(", ", [for r in var.walship_recipients : jsonencode(r)])}]   # public keys: the database host cannot decrypt"
    : "recipients = [\"age1...\"]   # replace with your public key(s) from `walship keygen`",
    "",
    "[s3]",
    "endpoint = ${jsonencode(local.endpoint)}",
    "region = ${jsonencode(var.minio_region)}",
    "path_style = true",
    "access_key_id = ${jsonencode(minio_iam_user.archiver.name)}",
    "secret_access_key_file = \"/etc/walship/s3-secret\"   # terraform output -raw archiver_secret_access_key",
    "",
  ])
}
