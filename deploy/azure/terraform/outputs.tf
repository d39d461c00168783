output "bucket" {
  value = "abfs://${azurerm_storage_container.bucket.name}@${azurerm_storage_account.mlfactory.name}.dfs.core.windows.net"
}

output "storage_account" {
  value = azurerm_storage_account.mlfactory.name
}

output "event_queue" {
  value = azurerm_storage_queue.landing.name
}

output "training_identity" {
  description = "the training jobs' identity (azure.training_identity)"
  value       = azurerm_user_assigned_identity.jobs["training"].id
}

output "serving_identity" {
  description = "the online endpoints' identity (azure.serving_identity; give it to azure.batch_compute's cluster too)"
  value       = azurerm_user_assigned_identity.jobs["serving"].id
}
