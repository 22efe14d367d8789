output "bucket_name" {
  description = "Name of the archive bucket."
  value       = aws_s3_bucket.this.id
}

output "bucket_arn" {
  description = "ARN of the archive bucket."
  value       = aws_s3_bucket.this.arn
}

output "bucket_region" {
  description = "Region of the archive bucket (s3.region in the walship configuration)."
  value       = aws_s3_bucket.this.region
}

output "key_prefix" {
  description = "Normalised repository prefix inside the bucket (\"\" or ending in '/')."
  value       = local.prefix
}

output "repo_url" {
  description = "The walship repository URL (repo = ... in the walship configuration)."
  value       = local.repo_url
}

output "archiver_policy_json" {
  description = "IAM policy document for database hosts (wal-push, backup-push, check): read and create objects under the prefix, no deletes."
  value       = data.aws_iam_policy_document.archiver.json
}

output "restorer_policy_json" {
  description = "IAM policy document for restore hosts (wal-fetch, backup-fetch, check): read objects and their versions under the prefix."
  value       = data.aws_iam_policy_document.restorer.json
}

output "maintainer_policy_json" {
  description = "IAM policy document for retention jobs and operators: read, and delete objects and versions under the prefix."
  value       = data.aws_iam_policy_document.maintainer.json
}

output "bucket_policy_json" {
  description = "The bucket policy that was applied (TLS only, conditional writes under the prefix)."
  value       = data.aws_iam_policy_document.bucket.json
}

output "policy_arns" {
  description = "ARNs of the managed IAM policies by kind (archiver, restorer, maintainer); empty when create_policies and create_roles are false."
  value       = { for kind, p in aws_iam_policy.this : kind => p.arn }
}

output "role_arns" {
  description = "ARNs of the IAM roles created by kind; only kinds with principals appear, and none unless create_roles."
  value       = { for kind, r in aws_iam_role.this : kind => r.arn }
}

output "role_names" {
  description = "Names of the IAM roles created by kind (e.g. for an aws_iam_instance_profile)."
  value       = { for kind, r in aws_iam_role.this : kind => r.name }
}

output "walship_config" {
  description = "A walship configuration (TOML) for this bucket, ready to paste into /etc/walship/walship.toml: `terraform output -raw walship_config`."
  value = join("\n", concat(
    [
      "# walship configuration for ${local.repo_url}",
      "repo = ${jsonencode(local.repo_url)}",
    ],
    length(var.walship_recipients) > 0 ? [
      "recipients = [${join(", ", [for r in var.walship_recipients : jsonencode(r)])}]   # public keys: the database host cannot decrypt",
      ] : [
      "# Replace with your age public key(s) from `walship keygen`; the identity stays off the database host.",
      "recipients = [\"age1...\"]",
    ],
    [
      "",
      "[s3]",
      "region = ${jsonencode(aws_s3_bucket.this.region)}",
      "# Credentials: the AWS chain (instance profile / role with the ${local.iam_name_prefix}-archiver policy),",
      "# or access_key_id plus secret_access_key_file; never on the command line.",
      "",
    ],
  ))
}
