variable "resource_group" {
  description = "the resource group of the Azure ML workspace (azure.resource_group); the storage account goes there too"
  type        = string
}

variable "workspace" {
  description = "the Azure ML workspace (azure.workspace): Airflow's Azure ML rights are assigned on it"
  type        = string
}

variable "storage_account" {
  description = "the storage account of the bucket (azure.storage_account)"
  type        = string
}

variable "container" {
  description = "the container that is the bucket (storage.bucket = abfs://<this>@<account>.dfs.core.windows.net)"
  type        = string
  default     = "mlfactory"
}

variable "event_queue" {
  description = "the Storage Queue Event Grid delivers BlobCreated events to (azure.event_queue)"
  type        = string
  default     = "mlfactory-landing"
}

variable "replication" {
  description = "the account's replication (LRS, ZRS, GRS, ...)"
  type        = string
  default     = "LRS"
}

variable "public_network_access" {
  description = "whether the storage account answers on public networks (false: private endpoints only)"
  type        = bool
  default     = true
}

variable "soft_delete_days" {
  description = "days a deleted or overwritten blob, or a deleted container, can be restored"
  type        = number
  default     = 30
}

variable "airflow_principal_id" {
  description = "object id of Airflow's identity (the azure and wasb connections: service principal or managed identity)"
  type        = string
}


variable "monthly_budget_usd" {
  description = "monthly budget of the resource group; a forecast past 80% of it emails alert_email"
  type        = number
  default     = 500
}

variable "budget_start_date" {
  description = "first day of the budget (the first of a month, RFC 3339)"
  type        = string
  default     = "2027-01-01T00:00:00Z"
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
