# mlfactory on Google Cloud: the bucket, GCS -> Pub/Sub landing notifications with a dead-letter topic, the
# service accounts of Airflow and of the Vertex AI jobs with the custom roles of deploy/gcp/*-role.yaml (the
# files the tests check for least privilege: one source of truth), and a monthly budget.
#
#   cd deploy/gcp/terraform
#   terraform init
#   terraform apply -var project=my-ml-project -var bucket_name=my-mlfactory -var billing_account=XXXXXX-XXXXXX-XXXXXX
#
# The pipeline config's `gcp:` section then takes the outputs (pubsub_subscription, service_account).

terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.10"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region
}

data "google_project" "this" {}

data "google_storage_project_service_account" "gcs" {}

locals {
  roles = {
    airflow = yamldecode(file("${path.module}/../airflow-role.yaml"))
    jobs    = yamldecode(file("${path.module}/../jobs-role.yaml"))
  }
  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

# --- the bucket ------------------------------------------------------------------------------------

resource "google_storage_bucket" "mlfactory" {
  name                        = var.bucket_name
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  labels                      = var.labels
  #checkov:skip=CKV_GCP_62:access logs go to Cloud Audit Logs (data access), not a second bucket
  versioning {
    enabled = true # raw/ must be immutable: an overwrite keeps the old generation
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_days
    }
    action {
      type = "Delete"
    }
  }
  dynamic "encryption" {
    for_each = var.kms_key_name == "" ? [] : [var.kms_key_name]
    content {
      default_kms_key_name = encryption.value
    }
  }
}

# --- landing events: GCS -> Pub/Sub, with a dead-letter topic -------------------------------------------

resource "google_pubsub_topic" "landing" {
  name         = "mlfactory-landing"
  labels       = var.labels
  kms_key_name = var.kms_key_name == "" ? null : var.kms_key_name
}

resource "google_pubsub_topic" "landing_dead_letter" {
  name         = "mlfactory-landing-dead-letter"
  labels       = var.labels
  kms_key_name = var.kms_key_name == "" ? null : var.kms_key_name
}

resource "google_pubsub_subscription" "landing" {
  name                       = "mlfactory-landing"
  topic                      = google_pubsub_topic.landing.id
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
  labels                     = var.labels
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.landing_dead_letter.id
    max_delivery_attempts = 5 # a message the watcher cannot read moves on after 5 deliveries
  }
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }
}

resource "google_pubsub_subscription" "landing_dead_letter" {
  name                       = "mlfactory-landing-dead-letter"
  topic                      = google_pubsub_topic.landing_dead_letter.id
  message_retention_duration = "1209600s" # 14 days to look at what failed
  labels                     = var.labels
}

# Pub/Sub's service agent forwards undeliverable messages: publisher on the dead-letter topic, subscriber
# on the source subscription
resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  topic  = google_pubsub_topic.landing_dead_letter.id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  subscription = google_pubsub_subscription.landing.id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

resource "google_pubsub_topic_iam_member" "gcs_publishes" {
  topic  = google_pubsub_topic.landing.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

resource "google_storage_notification" "landing" {
  bucket             = google_storage_bucket.mlfactory.name
  topic              = google_pubsub_topic.landing.id
  payload_format     = "JSON_API_V1"
  event_types        = ["OBJECT_FINALIZE"]
  object_name_prefix = "landing/"
  depends_on         = [google_pubsub_topic_iam_member.gcs_publishes]
}

# --- identities: Airflow and the Vertex AI jobs, with the repo's custom roles --------------------------

resource "google_service_account" "airflow" {
  account_id   = "mlfactory-airflow"
  display_name = "mlfactory Airflow (the gcp connection's identity)"
}

resource "google_service_account" "jobs" {
  account_id   = "mlfactory-jobs"
  display_name = "mlfactory Vertex AI jobs and endpoints (gcp.service_account)"
}

resource "google_project_iam_custom_role" "mlfactory" {
  for_each    = { airflow = "mlfactoryAirflow", jobs = "mlfactoryJobs" }
  role_id     = each.value
  title       = local.roles[each.key].title
  description = local.roles[each.key].description
  stage       = local.roles[each.key].stage
  permissions = local.roles[each.key].includedPermissions
}

resource "google_project_iam_member" "airflow" {
  project = var.project
  role    = google_project_iam_custom_role.mlfactory["airflow"].id
  member  = google_service_account.airflow.member
}

# The jobs read the whole bucket, and write and delete anywhere but the registry's prefix: the MLflow
# server writes mlflow/ (a job never replaces a registered model's files)
resource "google_storage_bucket_iam_member" "jobs_read" {
  bucket = google_storage_bucket.mlfactory.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.jobs.member
}

resource "google_storage_bucket_iam_member" "jobs" {
  bucket = google_storage_bucket.mlfactory.name
  role   = google_project_iam_custom_role.mlfactory["jobs"].id
  member = google_service_account.jobs.member
  condition {
    title       = "not-the-registry"
    description = "no write or delete under mlflow/ (the MLflow server's artifacts)"
    expression  = "!resource.name.startsWith(\"projects/_/buckets/${var.bucket_name}/objects/mlflow/\")"
  }
}

# --- spend ---------------------------------------------------------------------------------------------

resource "google_billing_budget" "mlfactory" {
  billing_account = var.billing_account
  display_name    = "mlfactory monthly"
  budget_filter {
    projects = ["projects/${data.google_project.this.number}"]
    labels   = var.labels
  }
  amount {
    specified_amount {
      currency_code = "USD"
      units         = tostring(var.monthly_budget_usd)
    }
  }
  threshold_rules {
    threshold_percent = 0.8
    spend_basis       = "FORECASTED_SPEND"
  }
  threshold_rules {
    threshold_percent = 1.0
  }
}
