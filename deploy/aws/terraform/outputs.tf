output "bucket" {
  value = "s3://${aws_s3_bucket.mlfactory.bucket}"
}

output "sqs_queue_url" {
  value = aws_sqs_queue.landing.url
}

output "role_arn" {
  description = "the training jobs' role (aws.role_arn)"
  value       = aws_iam_role.jobs["training"].arn
}

output "serving_role_arn" {
  description = "the endpoints' and batch transforms' role (aws.serving_role_arn)"
  value       = aws_iam_role.jobs["serving"].arn
}

output "airflow_policy_arn" {
  value = aws_iam_policy.airflow.arn
}

output "kms_key_id" {
  value = aws_kms_key.mlfactory.key_id
}
