variable "project" {
  description = "the Google Cloud project (gcp.project)"
  type        = string
}

variable "region" {
  description = "region of the bucket and the Vertex AI jobs (gcp.region)"
  type        = string
  default     = "us-central1"
}

variable "bucket_name" {
  description = "the pipeline's bucket (storage.bucket = gs://<this>)"
  type        = string
}

variable "kms_key_name" {
  description = "a Cloud KMS key for the bucket and the topics (gcp.kms_key_name); empty: Google-managed keys"
  type        = string
  default     = ""
}

variable "noncurrent_version_days" {
  description = "days an overwritten or deleted object's old generation is kept"
  type        = number
  default     = 30
}

variable "billing_account" {
  description = "the billing account the budget watches"
  type        = string
}

variable "monthly_budget_usd" {
  description = "monthly budget of the project; alerts at 80% forecast and 100% actual"
  type        = number
  default     = 500
}

variable "labels" {
  description = "labels on every resource"
  type        = map(string)
  default     = { project = "mlfactory" }
}
