# mlfactory on AWS: the bucket, S3 -> SQS landing notifications with a dead-letter queue, Airflow's IAM policy and
# the two roles SageMaker runs as, training and serving (their policies are deploy/aws/*.json, the files the tests
# check for least privilege: one source of truth), a KMS key for the bucket and the queues, and a monthly budget.
#
#   cd deploy/aws/terraform
#   terraform init
#   terraform apply -var bucket_name=my-mlfactory -var alert_email=me@example.com
#
# The pipeline config's `aws:` section then takes the outputs (sqs_queue_url, role_arn, serving_role_arn, kms_key_id).

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.80"
    }
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = var.tags
  }
}

data "aws_caller_identity" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  # deploy/aws/*.json name their resources with these placeholders
  policies = {
    for name in ["airflow-policy", "sagemaker-role-policy", "training-role-policy", "serving-role-policy", "trust-policy"] :
    name => replace(replace(replace(replace(
      replace(replace(replace(replace(replace(replace(file("${path.module}/../${name}.json"),
        "MLFACTORY_BUCKET", var.bucket_name),
        "MLFACTORY_LANDING_QUEUE", var.landing_queue_name),
        "MLFACTORY_TRAINING_ROLE", var.training_role_name),
        "MLFACTORY_SERVING_ROLE", var.serving_role_name),
        "MLFACTORY_IMAGE_REPOSITORY", var.image_repository),
      "MLFACTORY_KMS_KEY_ID", aws_kms_key.mlfactory.key_id),
      "MLFACTORY_MODEL", replace(var.model_name, "_", "-")),
      "MLFACTORY_ENDPOINT", var.endpoint_name),
      "REGION", var.region),
    "ACCOUNT_ID", local.account_id)
  }
}

# --- encryption ------------------------------------------------------------------------------------

resource "aws_kms_key" "mlfactory" {
  description         = "mlfactory: the bucket, the landing queues and the SageMaker jobs' volumes"
  enable_key_rotation = true
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministers"
        Effect    = "Allow"
        Principal = { AWS = "arn:aws:iam::${local.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "S3EncryptsLandingEvents"
        Effect    = "Allow"
        Principal = { Service = "s3.amazonaws.com" }
        Action    = ["kms:GenerateDataKey", "kms:Decrypt"]
        Resource  = "*"
        Condition = { StringEquals = { "aws:SourceAccount" = local.account_id } }
      },
    ]
  })
}

# --- the bucket ------------------------------------------------------------------------------------

resource "aws_s3_bucket" "mlfactory" {
  bucket = var.bucket_name
  #checkov:skip=CKV_AWS_144:cross-region replication is a disaster-recovery choice left to the operator
  #checkov:skip=CKV_AWS_18:access logging needs a second bucket; enable it with your organisation's log bucket
}

resource "aws_s3_bucket_versioning" "mlfactory" {
  bucket = aws_s3_bucket.mlfactory.id
  versioning_configuration {
    status = "Enabled" # raw/ must be immutable: an overwrite keeps the old version
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "mlfactory" {
  bucket = aws_s3_bucket.mlfactory.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.mlfactory.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "mlfactory" {
  bucket                  = aws_s3_bucket.mlfactory.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_lifecycle_configuration" "mlfactory" {
  bucket = aws_s3_bucket.mlfactory.id
  rule {
    id     = "old-versions-and-uploads"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

# --- landing events: S3 -> SQS, with a dead-letter queue --------------------------------------------

resource "aws_sqs_queue" "landing_dead_letter" {
  name                              = "${var.landing_queue_name}-dead-letter"
  message_retention_seconds         = 1209600 # 14 days to look at what failed
  kms_master_key_id                 = aws_kms_key.mlfactory.arn
  kms_data_key_reuse_period_seconds = 300
}

resource "aws_sqs_queue" "landing" {
  name                              = var.landing_queue_name
  visibility_timeout_seconds        = 300
  message_retention_seconds         = 345600
  kms_master_key_id                 = aws_kms_key.mlfactory.arn
  kms_data_key_reuse_period_seconds = 300
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.landing_dead_letter.arn
    maxReceiveCount     = 5 # a message the watcher cannot read moves here after 5 receives
  })
}

resource "aws_sqs_queue_policy" "landing" {
  queue_url = aws_sqs_queue.landing.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "BucketSendsLandingEvents"
      Effect    = "Allow"
      Principal = { Service = "s3.amazonaws.com" }
      Action    = "sqs:SendMessage"
      Resource  = aws_sqs_queue.landing.arn
      Condition = {
        ArnEquals    = { "aws:SourceArn" = aws_s3_bucket.mlfactory.arn }
        StringEquals = { "aws:SourceAccount" = local.account_id }
      }
    }]
  })
}

resource "aws_s3_bucket_notification" "landing" {
  bucket = aws_s3_bucket.mlfactory.id
  queue {
    queue_arn     = aws_sqs_queue.landing.arn
    events        = ["s3:ObjectCreated:*"]
    filter_prefix = "landing/"
  }
  depends_on = [aws_sqs_queue_policy.landing]
}

# --- identities: Airflow's policy, the roles SageMaker runs as ---------------------------------------

resource "aws_iam_policy" "airflow" {
  name        = "mlfactory-airflow"
  description = "What mlfactory's DAGs call (deploy/aws/airflow-policy.json); attach to Airflow's role or user"
  policy      = local.policies["airflow-policy"]
}

# Training jobs and the serving side (endpoints, batch transforms) run as two roles, each reading and writing its
# own prefixes only (deploy/aws/<job>-role-policy.json); what running a container takes (the image, logs, the VPC,
# the key) is sagemaker-role-policy.json, on both
resource "aws_iam_role" "jobs" {
  for_each           = { training = var.training_role_name, serving = var.serving_role_name }
  name               = each.value
  assume_role_policy = local.policies["trust-policy"]
}

resource "aws_iam_role_policy" "jobs_data" {
  for_each = aws_iam_role.jobs
  name     = "mlfactory-${each.key}-data"
  role     = each.value.id
  policy   = local.policies["${each.key}-role-policy"]
}

resource "aws_iam_role_policy" "jobs_container" {
  for_each = aws_iam_role.jobs
  name     = "mlfactory-sagemaker-container"
  role     = each.value.id
  policy   = local.policies["sagemaker-role-policy"]
}

# --- spend ---------------------------------------------------------------------------------------------

resource "aws_budgets_budget" "mlfactory" {
  name         = "mlfactory-monthly"
  budget_type  = "COST"
  limit_amount = tostring(var.monthly_budget_usd)
  limit_unit   = "USD"
  time_unit    = "MONTHLY"
  cost_filter {
    name   = "Service"
    values = ["Amazon SageMaker", "Amazon Simple Storage Service"]
  }
  notification {
    comparison_operator        = "GREATER_THAN"
    threshold                  = 80
    threshold_type             = "PERCENTAGE"
    notification_type          = "FORECASTED"
    subscriber_email_addresses = [var.alert_email]
  }
}
