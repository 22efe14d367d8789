# Least-privilege IAM policies for the three kinds of walship users, scoped to the repository prefix:
#
#   archiver    database hosts (wal-push, backup-push, check): read and create objects; nothing that
#               deletes, overwrites settings or shortens retention, so a compromised host cannot
#               destroy its own archive.
#   restorer    hosts that restore or follow the archive (wal-fetch, backup-fetch,
#               check --read-only): read only, including old versions. A host promoted to primary
#               needs the archiver's policy to archive.
#   maintainer  retention jobs and operators: the deletes that retention needs.
#
# The allowed actions are written out literally in each policy, and the denied ones once, in
# local.destructive_actions, so that the tests in terraform/tests can read and check them.

locals {
  # Refused explicitly to the archiver and the restorer (an explicit Deny wins over any Allow).
  destructive_actions = [
    "s3:DeleteObject",
    "s3:DeleteObjectVersion",
    "s3:DeleteObjectTagging",
    "s3:DeleteObjectVersionTagging",
    "s3:DeleteBucket",
    "s3:DeleteBucketPolicy",
    "s3:PutBucketPolicy",
    "s3:PutBucketVersioning",
    "s3:PutLifecycleConfiguration",
    "s3:PutBucketObjectLockConfiguration",
    "s3:PutObjectRetention",
    "s3:PutObjectLegalHold",
    "s3:BypassGovernanceRetention",
    "s3:PutReplicationConfiguration",
    "s3:PutEncryptionConfiguration",
    "s3:PutBucketOwnershipControls",
    "s3:PutBucketPublicAccessBlock",
    "s3:PutBucketAcl",
    "s3:PutObjectAcl",
    "s3:PutObjectVersionAcl",
  ]

  iam_name_prefix = coalesce(var.iam_name_prefix, var.bucket_name)

  # Restrict ListBucket to the prefix unless the repository is the whole bucket or asked otherwise.
  list_prefix_patterns = (local.prefix == "" || var.allow_bucket_wide_list) ? [] : ["${local.prefix}*"]

  kms_key_arns = var.kms_key_arn == null ? [] : [var.kms_key_arn]

  role_principals = {
    archiver   = var.archiver_principals
    restorer   = var.restorer_principals
    maintainer = var.maintainer_principals
  }
  # A role for each kind whose principals are given.
  roles = var.create_roles ? {
    for kind, p in local.role_principals : kind => p if length(p.aws) + length(p.services) > 0
  } : {}

  create_policies = var.create_policies || var.create_roles

  policy_documents = {
    archiver   = data.aws_iam_policy_document.archiver.json
    restorer   = data.aws_iam_policy_document.restorer.json
    maintainer = data.aws_iam_policy_document.maintainer.json
  }
  policy_descriptions = {
    archiver   = "walship archiver for ${local.repo_url}: read and create objects, no deletes"
    restorer   = "walship restorer for ${local.repo_url}: read objects and their versions"
    maintainer = "walship maintainer for ${local.repo_url}: read, and delete objects and versions"
  }
}

# ---------------------------------------------------------------------------------------------------
# archiver
# ---------------------------------------------------------------------------------------------------

data "aws_iam_policy_document" "archiver" {
  statement {
    sid       = "ListRepository"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    dynamic "condition" {
      for_each = length(local.list_prefix_patterns) > 0 ? [local.list_prefix_patterns] : []
      content {
        test     = "StringLike"
        variable = "s3:prefix"
        values   = condition.value
      }
    }
  }

  # `walship check` reports versioning and object lock.
  statement {
    sid       = "ReadBucketSettings"
    effect    = "Allow"
    actions   = ["s3:GetBucketLocation", "s3:GetBucketVersioning", "s3:GetBucketObjectLockConfiguration"]
    resources = [local.bucket_arn]
  }

  # PutObject creates objects (walship sends If-None-Match: *, which the bucket policy can enforce);
  # GetObject also covers HeadObject and the ranged header reads that detect a duplicate push.
  statement {
    sid       = "ReadAndCreateObjects"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject"]
    resources = [local.objects_arn]
  }

  dynamic "statement" {
    for_each = local.kms_key_arns
    content {
      sid       = "UseBucketKmsKey"
      effect    = "Allow"
      actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
      resources = [statement.value]

      # Only through S3: the key does not become usable for anything else a host could reach.
      condition {
        test     = "StringLike"
        variable = "kms:ViaService"
        values   = ["s3.*.amazonaws.com"]
      }
    }
  }

  # Belt and braces: even if someone attaches a broader policy to the database host's role, these
  # stay refused on this bucket (an explicit Deny wins over any Allow).
  statement {
    sid       = "DenyDestructive"
    effect    = "Deny"
    actions   = local.destructive_actions
    resources = [local.bucket_arn, "${local.bucket_arn}/*"]
  }
}

# ---------------------------------------------------------------------------------------------------
# restorer
# ---------------------------------------------------------------------------------------------------

data "aws_iam_policy_document" "restorer" {
  statement {
    sid       = "ListRepository"
    effect    = "Allow"
    actions   = ["s3:ListBucket", "s3:ListBucketVersions"]
    resources = [local.bucket_arn]

    dynamic "condition" {
      for_each = length(local.list_prefix_patterns) > 0 ? [local.list_prefix_patterns] : []
      content {
        test     = "StringLike"
        variable = "s3:prefix"
        values   = condition.value
      }
    }
  }

  statement {
    sid       = "ReadBucketSettings"
    effect    = "Allow"
    actions   = ["s3:GetBucketLocation", "s3:GetBucketVersioning", "s3:GetBucketObjectLockConfiguration"]
    resources = [local.bucket_arn]
  }

  # GetObjectVersion: restore from an older version if a current one was tampered with.
  statement {
    sid       = "ReadObjects"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = [local.objects_arn]
  }

  dynamic "statement" {
    for_each = local.kms_key_arns
    content {
      sid       = "UseBucketKmsKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      # Only through S3: the key does not become usable for anything else a host could reach.
      condition {
        test     = "StringLike"
        variable = "kms:ViaService"
        values   = ["s3.*.amazonaws.com"]
      }
    }
  }

  # Same explicit Deny as the archiver. It does not deny PutObject, so that a restore host promoted
  # to primary can archive once it is also given the archiver's policy.
  statement {
    sid       = "DenyDestructive"
    effect    = "Deny"
    actions   = local.destructive_actions
    resources = [local.bucket_arn, "${local.bucket_arn}/*"]
  }
}

# ---------------------------------------------------------------------------------------------------
# maintainer
# ---------------------------------------------------------------------------------------------------

data "aws_iam_policy_document" "maintainer" {
  statement {
    sid       = "ListRepository"
    effect    = "Allow"
    actions   = ["s3:ListBucket", "s3:ListBucketVersions"]
    resources = [local.bucket_arn]

    dynamic "condition" {
      for_each = length(local.list_prefix_patterns) > 0 ? [local.list_prefix_patterns] : []
      content {
        test     = "StringLike"
        variable = "s3:prefix"
        values   = condition.value
      }
    }
  }

  statement {
    sid       = "ReadBucketSettings"
    effect    = "Allow"
    actions   = ["s3:GetBucketLocation", "s3:GetBucketVersioning", "s3:GetBucketObjectLockConfiguration", "s3:GetLifecycleConfiguration"]
    resources = [local.bucket_arn]
  }

  statement {
    sid       = "ReadObjects"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectRetention", "s3:GetObjectLegalHold"]
    resources = [local.objects_arn]
  }

  # DeleteObject leaves a delete marker (the data stays as a noncurrent version until the lifecycle
  # rule expires it); DeleteObjectVersion removes a version at once, once its retention has ended.
  statement {
    sid       = "DeleteForRetention"
    effect    = "Allow"
    actions   = ["s3:DeleteObject", "s3:DeleteObjectVersion"]
    resources = [local.objects_arn]
  }

  dynamic "statement" {
    for_each = var.maintainer_can_bypass_governance ? [local.objects_arn] : []
    content {
      sid       = "BypassGovernanceRetention"
      effect    = "Allow"
      actions   = ["s3:BypassGovernanceRetention"]
      resources = [statement.value]
    }
  }

  dynamic "statement" {
    for_each = local.kms_key_arns
    content {
      sid       = "UseBucketKmsKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      # Only through S3: the key does not become usable for anything else a host could reach.
      condition {
        test     = "StringLike"
        variable = "kms:ViaService"
        values   = ["s3.*.amazonaws.com"]
      }
    }
  }
}

# ---------------------------------------------------------------------------------------------------
# Managed policies and (optional) roles
# ---------------------------------------------------------------------------------------------------

resource "aws_iam_policy" "this" {
  for_each = local.create_policies ? local.policy_documents : {}

  name        = "${local.iam_name_prefix}-${each.key}"
  path        = var.iam_path
  description = local.policy_descriptions[each.key]
  policy      = each.value

  tags = var.tags
}

data "aws_iam_policy_document" "assume" {
  for_each = local.roles

  statement {
    sid     = "AssumeWalship${title(each.key)}"
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    dynamic "principals" {
      for_each = length(each.value.aws) > 0 ? [each.value.aws] : []
      content {
        type        = "AWS"
        identifiers = principals.value
      }
    }

    dynamic "principals" {
      for_each = length(each.value.services) > 0 ? [each.value.services] : []
      content {
        type        = "Service"
        identifiers = principals.value
      }
    }
  }
}

resource "aws_iam_role" "this" {
  for_each = local.roles

  lifecycle {
    precondition {
      # IAM role names are at most 64 characters; the longest suffix is "-maintainer".
      condition     = length(local.iam_name_prefix) <= 53
      error_message = "Role names would exceed IAM's 64 characters: set iam_name_prefix (at most 53 characters) when bucket_name is longer than 53."
    }
  }

  name                 = "${local.iam_name_prefix}-${each.key}"
  path                 = var.iam_path
  description          = "walship ${each.key} for ${local.repo_url}"
  assume_role_policy   = data.aws_iam_policy_document.assume[each.key].json
  permissions_boundary = var.role_permissions_boundary

  tags = var.tags
}

resource "aws_iam_role_policy_attachment" "this" {
  for_each = local.roles

  role       = aws_iam_role.this[each.key].name
  policy_arn = aws_iam_policy.this[each.key].arn
}
