# The archive bucket for walship: versioned, optionally object-locked, encrypted, private, TLS-only,
# with lifecycle rules. The IAM side (archiver / restorer / maintainer) is in iam.tf.

locals {
  # "pg/main" and "pg/main/" both become "pg/main/"; "" stays "" (the whole bucket).
  prefix = var.key_prefix == "" ? "" : "${trimsuffix(var.key_prefix, "/")}/"

  bucket_arn = aws_s3_bucket.this.arn
  # Every object of the repository, and nothing else.
  objects_arn = "${aws_s3_bucket.this.arn}/${local.prefix}*"

  repo_url = local.prefix == "" ? "s3://${var.bucket_name}" : "s3://${var.bucket_name}/${trimsuffix(local.prefix, "/")}"

}

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_144:Cross-region replication needs a second bucket, region and role; it is a deployment choice, not part of this module. Versioning, object lock and the archiver's lack of delete rights are what protect the archive from a compromised host.
  #checkov:skip=CKV2_AWS_62:Event notifications have no consumer in walship; add aws_s3_bucket_notification next to the module if you want them.
  bucket = var.bucket_name

  # Object lock can only be chosen when the bucket is created (it also forces versioning on).
  object_lock_enabled = var.object_lock_enabled

  # Never delete archived WAL or backups together with the Terraform resource: a bucket that still
  # holds objects makes `terraform destroy` fail instead.
  force_destroy = false

  tags = var.tags

  lifecycle {
    precondition {
      condition     = !var.object_lock_enabled || var.noncurrent_version_expiration_days >= var.object_lock_days
      error_message = "noncurrent_version_expiration_days (${var.noncurrent_version_expiration_days}) must be >= object_lock_days (${var.object_lock_days}): S3 cannot remove a version before its retention ends, so a shorter expiry would not do what it says."
    }
    precondition {
      condition     = !var.create_roles || length(local.roles) > 0
      error_message = "create_roles is true but archiver_principals, restorer_principals and maintainer_principals are all empty: give at least one of them, e.g. archiver_principals = { services = [\"ec2.amazonaws.com\"] }."
    }
  }
}

# ACLs off: the bucket owner owns every object, and access is decided by policies alone.
resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket = aws_s3_bucket.this.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# walship relies on versioning: an object that is deleted (or, without enforced conditional writes,
# overwritten) stays recoverable as a noncurrent version until the lifecycle rule below expires it.
resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    # S3 Bucket Keys cut the KMS requests (and their cost) per object; meaningless for SSE-S3.
    bucket_key_enabled = var.kms_key_arn != null
  }
}

# Default retention for every new object version. Deleting a version before its retention ends is
# refused: in GOVERNANCE mode unless the caller has s3:BypassGovernanceRetention, in COMPLIANCE mode
# for everybody.
resource "aws_s3_bucket_object_lock_configuration" "this" {
  count = var.object_lock_enabled ? 1 : 0

  bucket = aws_s3_bucket.this.id

  rule {
    default_retention {
      mode = var.object_lock_mode
      days = var.object_lock_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  # A noncurrent version exists only after a delete (or an overwrite): keep it long enough to notice
  # and undo the mistake, then remove it. Delete markers left with no versions behind are removed too.
  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"

    # The repository's keys; an explicit prefix, since provider 5.86+ warns on (and mishandled)
    # an empty filter.
    filter {
      prefix = local.prefix
    }

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }

    expiration {
      expired_object_delete_marker = true
    }
  }

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    # The whole bucket (an explicit empty prefix: provider 5.86+ warns on, and mishandled, an
    # empty filter). walship makes no multipart uploads; others' leftovers cost money.
    filter {
      prefix = ""
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_upload_days
    }
  }

  # Optional, off by default: WAL and base backups to an instant-retrieval storage class.
  dynamic "rule" {
    for_each = var.transitions

    content {
      id     = "transition-${rule.key}"
      status = "Enabled"

      filter {
        prefix = "${local.prefix}${rule.key}/"
      }

      transition {
        days          = rule.value.days
        storage_class = rule.value.storage_class
      }
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

resource "aws_s3_bucket_logging" "this" {
  count = var.access_logs == null ? 0 : 1

  bucket        = aws_s3_bucket.this.id
  target_bucket = var.access_logs.bucket
  target_prefix = coalesce(var.access_logs.prefix, "${var.bucket_name}/")
}

# ---------------------------------------------------------------------------------------------------
# Bucket policy: TLS only, and (by default) no unconditional PutObject under the repository prefix.
# ---------------------------------------------------------------------------------------------------

data "aws_iam_policy_document" "bucket" {
  statement {
    sid    = "DenyInsecureTransport"
    effect = "Deny"

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    actions   = ["s3:*"]
    resources = [aws_s3_bucket.this.arn, "${aws_s3_bucket.this.arn}/*"]

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid    = "DenyTlsBelow12"
    effect = "Deny"

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    actions   = ["s3:*"]
    resources = [aws_s3_bucket.this.arn, "${aws_s3_bucket.this.arn}/*"]

    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }

  # walship writes every object with `If-None-Match: *` (create only, never overwrite). Refusing any
  # other PutObject under the prefix means a stolen credential cannot put a new current version over
  # an archived WAL segment or backup either (the old one would survive as a noncurrent version, but
  # recovery reads the current one). This also refuses CopyObject and multipart uploads there.
  dynamic "statement" {
    for_each = var.enforce_conditional_writes ? [local.objects_arn] : []

    content {
      sid    = "DenyPutWithoutIfNoneMatch"
      effect = "Deny"

      principals {
        type        = "*"
        identifiers = ["*"]
      }

      actions   = ["s3:PutObject"]
      resources = [statement.value]

      condition {
        test     = "Null"
        variable = "s3:if-none-match"
        values   = ["true"]
      }
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket = aws_s3_bucket.this.id
  policy = data.aws_iam_policy_document.bucket.json

  # S3 rejects policies while the public access block is being applied.
  depends_on = [aws_s3_bucket_public_access_block.this]
}
