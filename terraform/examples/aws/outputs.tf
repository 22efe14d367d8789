output "walship_config" {
  description = "Paste into /etc/walship/walship.toml on the database host: terraform output -raw walship_config"
  value       = module.walship_bucket.walship_config
}

output "bucket_name" {
  description = "The archive bucket."
  value       = module.walship_bucket.bucket_name
}

output "archiver_instance_profile" {
  description = "Instance profile for database hosts (archiver policy)."
  value       = aws_iam_instance_profile.archiver.name
}

output "restorer_instance_profile" {
  description = "Instance profile for restore hosts (restorer policy)."
  value       = aws_iam_instance_profile.restorer.name
}

output "policy_arns" {
  description = "Managed policies by kind; attach the maintainer policy to whoever runs retention."
  value       = module.walship_bucket.policy_arns
}
