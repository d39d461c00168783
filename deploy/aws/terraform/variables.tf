variable "region" {
  description = "AWS region of the bucket, the queues and the SageMaker jobs"
  type        = string
  default     = "eu-west-1"
}

variable "bucket_name" {
  description = "the pipeline's bucket (storage.bucket = s3://<this>)"
  type        = string
}

variable "landing_queue_name" {
  description = "the SQS queue S3 sends landing/ events to (aws.sqs_queue_url)"
  type        = string
  default     = "mlfactory-landing"
}

variable "training_role_name" {
  description = "the role SageMaker training jobs run as (aws.role_arn)"
  type        = string
  default     = "mlfactory-training"
}

variable "serving_role_name" {
  description = "the role SageMaker endpoints and batch transforms run as (aws.serving_role_arn)"
  type        = string
  default     = "mlfactory-serving"
}

variable "model_name" {
  description = "the registered model (mlflow.model_name): Airflow may create and change only its SageMaker models, endpoint configs and transform jobs"
  type        = string
  default     = "customer_churn"
}

variable "endpoint_name" {
  description = "the SageMaker endpoint (serving.endpoint_name, else the model name with - for _): the only one Airflow may create or update"
  type        = string
  default     = "customer-churn"
}

variable "image_repository" {
  description = "the ECR repository of the training / serving image (docker/runtime.Dockerfile)"
  type        = string
  default     = "mlfactory"
}

variable "noncurrent_version_days" {
  description = "days an overwritten or deleted object's old version is kept"
  type        = number
  default     = 30
}

variable "monthly_budget_usd" {
  description = "monthly SageMaker + S3 budget; a forecast past 80% of it emails alert_email"
  type        = number
  default     = 500
}

variable "alert_email" {
  description = "who the budget alert goes to"
  type        = string
}

variable "tags" {
  description = "tags on every resource"
  type        = map(string)
  default     = { project = "mlfactory" }
}
