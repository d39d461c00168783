output "bucket" {
  value = "gs://${google_storage_bucket.mlfactory.name}"
}

output "pubsub_subscription" {
  value = google_pubsub_subscription.landing.id
}

output "airflow_service_account" {
  value = google_service_account.airflow.email
}

output "service_account" {
  value = google_service_account.jobs.email
}
