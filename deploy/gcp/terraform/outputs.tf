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
  description = "the training jobs' account (gcp.service_account)"
  value       = google_service_account.jobs["training"].email
}

output "serving_service_account" {
  description = "the endpoints' and batch prediction's account (gcp.serving_service_account)"
  value       = google_service_account.jobs["serving"].email
}
