output "bucket" {
  value = "s3://${aws_s3_bucket.mlfactory.bucket}"
}

output "sqs_queue_url" {
  value = aws_sqs_queue.landing.url
}

output "sagemaker_role_arn" {
  value = aws_iam_role.sagemaker.arn
}

output "airflow_policy_arn" {
  value = aws_iam_policy.airflow.arn
}

output "kms_key_id" {
  value = aws_kms_key.mlfactory.key_id
}
