# mlfactory on Google Cloud: the bucket, GCS -> Pub/Sub landing notifications with a dead-letter topic, the
# service accounts of Airflow, of the training jobs and of the serving side with the custom roles of
# deploy/gcp/*-role.yaml, each bound on what it acts on (the bucket with conditions on object names from
# deploy/bucket-prefixes.yaml, the subscription, the jobs' service accounts; the files the tests check for least
# privilege: one source of truth), and a monthly budget.
#
#   cd deploy/gcp/terraform
#   terraform init
#   terraform apply -var project=my-ml-project -var bucket_name=my-mlfactory -var billing_account=XXXXXX-XXXXXX-XXXXXX
#
# The pipeline config's `gcp:` section then takes the outputs (pubsub_subscription, service_account,
# serving_service_account).

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
    for name in ["airflow", "airflow-bucket", "object-reader", "object-writer", "landing", "act-as"] :
    name => yamldecode(file("${path.module}/../${name}-role.yaml"))
  }
  prefixes     = yamldecode(file("${path.module}/../../bucket-prefixes.yaml"))
  objects      = "projects/_/buckets/${var.bucket_name}/objects/"
  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
  # each prefix list of bucket-prefixes.yaml as an IAM condition: the objects under any of its prefixes
  under = {
    for who, lists in local.prefixes : who => {
      for access, prefixes in lists :
      access => join(" || ", [for prefix in prefixes : "resource.name.startsWith(\"${local.objects}${prefix}\")"])
    }
  }
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

# --- identities: Airflow, the training jobs and the serving side, with the repo's custom roles -------------

resource "google_service_account" "airflow" {
  account_id   = "mlfactory-airflow"
  display_name = "mlfactory Airflow (the gcp connection's identity)"
}

resource "google_service_account" "jobs" {
  for_each     = { training = "gcp.service_account", serving = "gcp.serving_service_account" }
  account_id   = "mlfactory-${each.key}"
  display_name = "mlfactory ${each.key} on Vertex AI (${each.value})"
}

resource "google_project_iam_custom_role" "mlfactory" {
  for_each    = local.roles
  role_id     = "mlfactory_${replace(each.key, "-", "_")}"
  title       = each.value.title
  description = each.value.description
  stage       = each.value.stage
  permissions = each.value.includedPermissions
}

# The one project-wide binding: Vertex AI checks custom jobs, models, endpoints, batch prediction jobs and operations
# on the project's location and takes IAM policies on none of them, so its role holds aiplatform.* alone
resource "google_project_iam_member" "airflow" {
  project = var.project
  role    = google_project_iam_custom_role.mlfactory["airflow"].id
  member  = google_service_account.airflow.member
}

# Airflow reads, lists and creates objects anywhere in the bucket ...
resource "google_storage_bucket_iam_member" "airflow" {
  bucket = google_storage_bucket.mlfactory.name
  role   = google_project_iam_custom_role.mlfactory["airflow-bucket"].id
  member = google_service_account.airflow.member
}

# ... and replaces or deletes any but the raw snapshots and the frozen holdout (an overwrite needs
# storage.objects.delete): those it creates once (ingest, ml_train) and never changes
resource "google_storage_bucket_iam_member" "airflow_replace" {
  bucket = google_storage_bucket.mlfactory.name
  role   = google_project_iam_custom_role.mlfactory["object-writer"].id
  member = google_service_account.airflow.member
  condition {
    title       = "never-the-raw-snapshots-or-the-holdout"
    description = "no overwrite or delete under ${join(", ", local.prefixes.airflow.write_once)} (deploy/bucket-prefixes.yaml)"
    expression  = "!(${local.under.airflow.write_once}) || ${local.under.airflow.write_once_except}"
  }
}

resource "google_pubsub_subscription_iam_member" "airflow" {
  subscription = google_pubsub_subscription.landing.name
  role         = google_project_iam_custom_role.mlfactory["landing"].id
  member       = google_service_account.airflow.member
}

# Airflow starts Vertex AI work as the training and the serving accounts, and as no other
resource "google_service_account_iam_member" "airflow" {
  for_each           = google_service_account.jobs
  service_account_id = each.value.name
  role               = google_project_iam_custom_role.mlfactory["act-as"].id
  member             = google_service_account.airflow.member
}

# Each job's account reads its own prefixes (and lists: a listing's resource is the bucket) and writes its own, never
# raw/, the holdout or the registry's mlflow/, which the MLflow server writes (deploy/bucket-prefixes.yaml)
resource "google_storage_bucket_iam_member" "jobs_read" {
  for_each = google_service_account.jobs
  bucket   = google_storage_bucket.mlfactory.name
  role     = google_project_iam_custom_role.mlfactory["object-reader"].id
  member   = each.value.member
  condition {
    title       = "${each.key}-reads"
    description = "read under ${join(", ", local.prefixes[each.key].read)} (deploy/bucket-prefixes.yaml)"
    expression  = "resource.type == \"storage.googleapis.com/Bucket\" || ${local.under[each.key].read}"
  }
}

resource "google_storage_bucket_iam_member" "jobs_write" {
  for_each = google_service_account.jobs
  bucket   = google_storage_bucket.mlfactory.name
  role     = google_project_iam_custom_role.mlfactory["object-writer"].id
  member   = each.value.member
  condition {
    title       = "${each.key}-writes"
    description = "write under ${join(", ", local.prefixes[each.key].write)} (deploy/bucket-prefixes.yaml)"
    expression  = local.under[each.key].write
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
