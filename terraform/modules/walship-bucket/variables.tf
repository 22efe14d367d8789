# ---------------------------------------------------------------------------------------------------
# The bucket and the repository inside it
# ---------------------------------------------------------------------------------------------------

variable "bucket_name" {
  description = "Name of the S3 bucket to create (globally unique). walship accepts lowercase letters, digits, '-' and '.'."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name)) && !strcontains(var.bucket_name, "..")
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits, '-' and '.', starting and ending with a letter or digit."
  }
}

variable "key_prefix" {
  description = <<-EOT
    Key prefix of the walship repository inside the bucket, e.g. "pg/main" (a trailing '/' is added).
    The IAM policies are scoped to it. "" puts the repository at the root of the bucket and scopes the
    policies to the whole bucket.
  EOT
  type        = string

  validation {
    # Path components of letters, digits, '_', '-', '.', '=' (no IAM wildcards, no leading '/').
    condition = var.key_prefix == "" || (
      can(regex("^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*/?$", var.key_prefix)) &&
      !contains(split("/", trimsuffix(var.key_prefix, "/")), ".") &&
      !contains(split("/", trimsuffix(var.key_prefix, "/")), "..")
    )
    error_message = "key_prefix must be \"\" or '/'-separated names of letters, digits, '_', '-', '.' and '=' (no leading '/', no '//', no '*' or '?', no '.' or '..' component), e.g. \"pg/main\"."
  }
}

variable "tags" {
  description = "Tags added to every resource the module creates."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------------------------------
# Encryption at rest (walship already encrypts every object with age before upload)
# ---------------------------------------------------------------------------------------------------

variable "kms_key_arn" {
  description = "ARN of a customer-managed KMS key (not an alias: IAM grants use by key ARN) for SSE-KMS. null (default) uses SSE-S3 (AES256). With a key, the archiver, restorer and maintainer policies also get the kms:GenerateDataKey/kms:Decrypt they need on it; the key policy must let IAM policies grant that (the default key policy does)."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", var.kms_key_arn))
    error_message = "kms_key_arn must be null or a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)."
  }
}

# ---------------------------------------------------------------------------------------------------
# Object lock (write once, read many)
# ---------------------------------------------------------------------------------------------------

variable "object_lock_enabled" {
  description = <<-EOT
    Create the bucket with S3 Object Lock and a default retention (object_lock_mode, object_lock_days):
    no version can then be deleted before its retention ends. Object lock can only be chosen when the
    bucket is created: changing this on an existing bucket makes Terraform plan a replacement (which
    fails while the bucket holds objects).
  EOT
  type        = bool
  default     = false
}

variable "object_lock_mode" {
  description = "Default retention mode: GOVERNANCE (principals with s3:BypassGovernanceRetention can still delete) or COMPLIANCE (nobody can, not even the account root, until retention ends)."
  type        = string
  default     = "GOVERNANCE"

  validation {
    condition     = contains(["GOVERNANCE", "COMPLIANCE"], var.object_lock_mode)
    error_message = "object_lock_mode must be \"GOVERNANCE\" or \"COMPLIANCE\"."
  }
}

variable "object_lock_days" {
  description = "Default retention in days for every new object version when object_lock_enabled. Must not exceed noncurrent_version_expiration_days."
  type        = number
  default     = 30

  validation {
    condition     = var.object_lock_days >= 1 && var.object_lock_days <= 36500 && floor(var.object_lock_days) == var.object_lock_days
    error_message = "object_lock_days must be a whole number of days between 1 and 36500."
  }
}

# ---------------------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------------------

variable "noncurrent_version_expiration_days" {
  description = <<-EOT
    Days after which a noncurrent object version (one that was deleted, or, if conditional writes are
    not enforced, overwritten) is removed for good. This is the window in which a wrongly deleted WAL
    segment or backup can still be recovered. With object lock it must be >= object_lock_days.
  EOT
  type        = number
  default     = 90

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1 && floor(var.noncurrent_version_expiration_days) == var.noncurrent_version_expiration_days
    error_message = "noncurrent_version_expiration_days must be a whole number of days >= 1."
  }
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Days after which incomplete multipart uploads are aborted (walship uses single PUTs; this cleans up after other tools)."
  type        = number
  default     = 7

  validation {
    condition     = var.abort_incomplete_multipart_upload_days >= 1 && floor(var.abort_incomplete_multipart_upload_days) == var.abort_incomplete_multipart_upload_days
    error_message = "abort_incomplete_multipart_upload_days must be a whole number of days >= 1."
  }
}

variable "transitions" {
  description = <<-EOT
    Move a repository subtree to a cheaper storage class this many days after its objects were
    written, keyed by subtree: "wal" (<prefix>wal/) and/or "backups" (<prefix>backups/). Empty
    (default): everything stays in STANDARD. Only instant-retrieval classes are allowed:
    STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING, GLACIER_IR.
  EOT
  type = map(object({
    days          = number
    storage_class = optional(string, "STANDARD_IA")
  }))
  default = {}

  validation {
    condition     = alltrue([for k in keys(var.transitions) : contains(["wal", "backups"], k)])
    error_message = "transitions keys must be \"wal\" or \"backups\", the repository's subtrees."
  }

  validation {
    condition     = alltrue([for t in values(var.transitions) : contains(["STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR"], t.storage_class)])
    error_message = "transitions[*].storage_class must be STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING or GLACIER_IR: GLACIER and DEEP_ARCHIVE objects cannot be read with a plain GetObject until they are restored, so wal-fetch and backup-fetch (and with them PostgreSQL recovery) would fail."
  }

  validation {
    condition = alltrue([for t in values(var.transitions) :
      floor(t.days) == t.days && t.days >= (contains(["STANDARD_IA", "ONEZONE_IA"], t.storage_class) ? 30 : 0)
    ])
    error_message = "transitions[*].days must be a whole number >= 0, and >= 30 for STANDARD_IA and ONEZONE_IA (an S3 rule)."
  }
}

variable "access_logs" {
  description = "Send S3 server access logs to this existing log bucket (which must allow the S3 logging service to write), under prefix (default \"<bucket_name>/\"). null (default): no access logs."
  type = object({
    bucket = string
    prefix = optional(string)
  })
  default = null
}

# ---------------------------------------------------------------------------------------------------
# Bucket policy
# ---------------------------------------------------------------------------------------------------

variable "enforce_conditional_writes" {
  description = <<-EOT
    Deny, in the bucket policy, every PutObject under the repository prefix that lacks an
    If-None-Match header (S3 condition key s3:if-none-match). walship always sends
    `If-None-Match: *`, so it is unaffected; a compromised host can then not even create a new
    current version over an archived object. Side effects under the prefix: CopyObject and multipart
    uploads are refused for everyone.
  EOT
  type        = bool
  default     = true
}

# ---------------------------------------------------------------------------------------------------
# IAM
# ---------------------------------------------------------------------------------------------------

variable "allow_bucket_wide_list" {
  description = <<-EOT
    Let the archiver, restorer and maintainer list the whole bucket instead of only keys under the
    prefix. walship does not need it: HeadBucket, which S3 authorizes as s3:ListBucket without a
    prefix, is denied to a prefix-scoped role, and `walship check` then decides by listing the
    prefix. Other clients may need it. Listing reveals key names only, never contents. Irrelevant
    when key_prefix is "".
  EOT
  type        = bool
  default     = false
}

variable "create_policies" {
  description = "Create the archiver, restorer and maintainer documents as managed IAM policies (aws_iam_policy). The documents are output either way."
  type        = bool
  default     = true
}

variable "create_roles" {
  description = "Create an IAM role for each of archiver, restorer and maintainer whose *_principals is not empty, with its policy attached (implies the managed policies)."
  type        = bool
  default     = false
}

variable "archiver_principals" {
  description = "Who may assume the archiver role (the database hosts): AWS principal ARNs and/or service principals, e.g. { services = [\"ec2.amazonaws.com\"] }."
  type = object({
    aws      = optional(list(string), [])
    services = optional(list(string), [])
  })
  default = {}
}

variable "restorer_principals" {
  description = "Who may assume the restorer role (hosts that restore or run replicas): AWS principal ARNs and/or service principals."
  type = object({
    aws      = optional(list(string), [])
    services = optional(list(string), [])
  })
  default = {}
}

variable "maintainer_principals" {
  description = "Who may assume the maintainer role (retention jobs, operators): AWS principal ARNs and/or service principals."
  type = object({
    aws      = optional(list(string), [])
    services = optional(list(string), [])
  })
  default = {}
}

variable "maintainer_can_bypass_governance" {
  description = "Grant the maintainer s3:BypassGovernanceRetention, so it can delete versions still under GOVERNANCE retention. Off by default: retention should be allowed to run out."
  type        = bool
  default     = false
}

variable "iam_name_prefix" {
  description = "Prefix for the names of IAM policies and roles; null uses the bucket name (\"<bucket>-archiver\", ...)."
  type        = string
  default     = null

  validation {
    condition     = var.iam_name_prefix == null || can(regex("^[A-Za-z0-9+=,.@_-]{1,50}$", var.iam_name_prefix))
    error_message = "iam_name_prefix must be 1-50 characters of letters, digits and +=,.@_-."
  }
}

variable "iam_path" {
  description = "IAM path for the policies and roles."
  type        = string
  default     = "/"

  validation {
    condition     = startswith(var.iam_path, "/") && endswith(var.iam_path, "/") && length(var.iam_path) <= 512
    error_message = "iam_path must begin and end with '/'."
  }
}

variable "role_permissions_boundary" {
  description = "ARN of a permissions boundary policy for the created roles, or null."
  type        = string
  default     = null
}

# ---------------------------------------------------------------------------------------------------
# The walship configuration snippet
# ---------------------------------------------------------------------------------------------------

variable "walship_recipients" {
  description = "age public keys (age1...) to put in the walship configuration snippet output. Empty: a placeholder is written. Public keys only: the database host never gets the identity."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for r in var.walship_recipients : can(regex("^age1[0-9a-z]+$", r))])
    error_message = "walship_recipients must be age public keys (age1...), never identities (AGE-SECRET-KEY-...)."
  }
}
