variable "region" {
  description = "AWS region for the archive bucket; ideally not the database's own region, so that a regional outage does not take both."
  type        = string
  default     = "eu-central-1"
}

variable "bucket_name" {
  description = "Globally unique name for the archive bucket."
  type        = string
}

variable "key_prefix" {
  description = "Repository prefix inside the bucket, one per PostgreSQL cluster."
  type        = string
  default     = "pg/main"
}

variable "walship_recipients" {
  description = "age public keys (from `walship keygen`) for the configuration snippet."
  type        = list(string)
  default     = []
}
