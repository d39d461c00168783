output "bucket" {
  value = "abfs://${azurerm_storage_container.bucket.name}@${azurerm_storage_account.mlfactory.name}.dfs.core.windows.net"
}

output "storage_account" {
  value = azurerm_storage_account.mlfactory.name
}

output "event_queue" {
  value = azurerm_storage_queue.landing.name
}
