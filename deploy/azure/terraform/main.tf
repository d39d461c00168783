# mlfactory on Azure: the storage account and container (the bucket, abfs://), Blob created -> Event Grid ->
# Storage Queue landing events with the poison queue and an Event Grid dead-letter container, the training and
# serving identities, the custom roles of deploy/azure/*-role.json (the files the tests check for least privilege:
# one source of truth) assigned to Airflow's identity and to those two where each applies (the workspace, the
# container with ABAC conditions from deploy/bucket-prefixes.yaml, the queues), and a monthly budget.
# The Azure ML workspace itself is yours (azure.workspace): pass its resource group and name, then attach both
# identities to it and give azure.batch_compute's cluster the serving one.
#
#   cd deploy/azure/terraform
#   terraform init
#   terraform apply -var resource_group=ml-rg -var workspace=mlfactory-ws -var storage_account=mlfactorydata \
#     -var airflow_principal_id=<object id> -var alert_email=me@example.com
#
# The pipeline config's `azure:` section then takes the outputs (storage_account, event_queue, training_identity,
# serving_identity).

terraform {
  required_version = ">= 1.5"
  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.10"
    }
  }
}

provider "azurerm" {
  features {}
  storage_use_azuread = true # the account takes no shared keys: containers and queues through Entra ID
}

data "azurerm_resource_group" "ml" {
  name = var.resource_group
}

locals {
  roles = {
    for name in ["airflow", "airflow-monitor", "jobs"] : name => jsondecode(file("${path.module}/../${name}-role.json"))
  }
  landing_subject = "/blobServices/default/containers/${var.container}/blobs/landing/"
  workspace       = "${data.azurerm_resource_group.ml.id}/providers/Microsoft.MachineLearningServices/workspaces/${var.workspace}"
  prefixes        = yamldecode(file("${path.module}/../../bucket-prefixes.yaml"))
  blobs           = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs"
  # each prefix list of bucket-prefixes.yaml as an ABAC expression: the blobs under any of its prefixes
  under = {
    for who, lists in local.prefixes : who => {
      for access, prefixes in lists :
      access => join(" OR ", [for prefix in prefixes : "@Resource[${local.blobs}:path] StringStartsWith '${prefix}'"])
    }
  }
}

# --- the bucket ------------------------------------------------------------------------------------

resource "azurerm_storage_account" "mlfactory" {
  name                            = var.storage_account
  resource_group_name             = data.azurerm_resource_group.ml.name
  location                        = data.azurerm_resource_group.ml.location
  account_tier                    = "Standard"
  account_replication_type        = var.replication
  account_kind                    = "StorageV2"
  is_hns_enabled                  = true # ADLS Gen2: abfs://
  min_tls_version                 = "TLS1_2"
  https_traffic_only_enabled      = true
  allow_nested_items_to_be_public = false
  shared_access_key_enabled       = false # Entra ID only: the connections use identities, never account keys
  local_user_enabled              = false # no SFTP/local users either
  public_network_access_enabled   = var.public_network_access
  tags                            = var.tags
  #checkov:skip=CKV_AZURE_33:queue logging is classic Storage Analytics; use diagnostic settings to Log Analytics
  #checkov:skip=CKV_AZURE_59:public network access is a variable (public_network_access); private endpoints are the operator's network
  #checkov:skip=CKV2_AZURE_1:customer-managed keys are optional; Microsoft-managed keys encrypt at rest
  #checkov:skip=CKV2_AZURE_33:private endpoints depend on the operator's virtual network
  #checkov:skip=CKV_AZURE_206:replication is a variable (replication); LRS is the cheap default for one region
  blob_properties {
    delete_retention_policy {
      days = var.soft_delete_days # raw/ must be immutable: a deleted or overwritten blob is kept this long
    }
    container_delete_retention_policy {
      days = var.soft_delete_days
    }
  }
  sas_policy {
    expiration_period = "01.00:00:00"
  }
}

resource "azurerm_storage_container" "bucket" {
  #checkov:skip=CKV2_AZURE_21:read logging is a diagnostic setting into the operator's Log Analytics workspace
  name                  = var.container
  storage_account_id    = azurerm_storage_account.mlfactory.id
  container_access_type = "private"
}

resource "azurerm_storage_container" "dead_letter" {
  #checkov:skip=CKV2_AZURE_21:read logging is a diagnostic setting into the operator's Log Analytics workspace
  name                  = "${var.container}-event-dead-letter"
  storage_account_id    = azurerm_storage_account.mlfactory.id
  container_access_type = "private"
}

# --- landing events: Blob created -> Event Grid -> Storage Queue (poison queue beside it) --------------

resource "azurerm_storage_queue" "landing" {
  name                 = var.event_queue
  storage_account_name = azurerm_storage_account.mlfactory.name
}

# the landing watcher moves a message it cannot read here after 5 deliveries (Azure Functions' convention)
resource "azurerm_storage_queue" "landing_poison" {
  name                 = "${var.event_queue}-poison"
  storage_account_name = azurerm_storage_account.mlfactory.name
}

resource "azurerm_eventgrid_system_topic" "storage" {
  name                = "${var.storage_account}-events"
  resource_group_name = data.azurerm_resource_group.ml.name
  location            = data.azurerm_resource_group.ml.location
  source_resource_id  = azurerm_storage_account.mlfactory.id
  topic_type          = "Microsoft.Storage.StorageAccounts"
  tags                = var.tags
  identity {
    type = "SystemAssigned" # delivers to the queue and dead-letters with its own identity, no key
  }
}

resource "azurerm_role_assignment" "events_send" {
  scope                = azurerm_storage_account.mlfactory.id
  role_definition_name = "Storage Queue Data Message Sender"
  principal_id         = azurerm_eventgrid_system_topic.storage.identity[0].principal_id
}

resource "azurerm_role_assignment" "events_dead_letter" {
  scope                = azurerm_storage_container.dead_letter.id
  role_definition_name = "Storage Blob Data Contributor"
  principal_id         = azurerm_eventgrid_system_topic.storage.identity[0].principal_id
}

resource "azurerm_eventgrid_system_topic_event_subscription" "landing" {
  name                  = "mlfactory-landing"
  system_topic          = azurerm_eventgrid_system_topic.storage.name
  resource_group_name   = data.azurerm_resource_group.ml.name
  included_event_types  = ["Microsoft.Storage.BlobCreated"]
  event_delivery_schema = "EventGridSchema"
  subject_filter {
    subject_begins_with = local.landing_subject
  }
  delivery_identity {
    type = "SystemAssigned"
  }
  storage_queue_endpoint {
    storage_account_id                    = azurerm_storage_account.mlfactory.id
    queue_name                            = azurerm_storage_queue.landing.name
    queue_message_time_to_live_in_seconds = 604800
  }
  dead_letter_identity {
    type = "SystemAssigned"
  }
  storage_blob_dead_letter_destination {
    storage_account_id          = azurerm_storage_account.mlfactory.id
    storage_blob_container_name = azurerm_storage_container.dead_letter.name
  }
  retry_policy {
    max_delivery_attempts = 30
    event_time_to_live    = 1440
  }
  depends_on = [azurerm_role_assignment.events_send, azurerm_role_assignment.events_dead_letter]
}

# --- identities: the training and serving identities, the repo's custom roles where each applies ----------

resource "azurerm_user_assigned_identity" "jobs" {
  for_each            = toset(["training", "serving"])
  name                = "mlfactory-${each.key}"
  resource_group_name = data.azurerm_resource_group.ml.name
  location            = data.azurerm_resource_group.ml.location
  tags                = var.tags
}

resource "azurerm_role_definition" "mlfactory" {
  for_each    = local.roles
  name        = each.value.Name
  description = each.value.Description
  scope       = data.azurerm_resource_group.ml.id
  permissions {
    actions          = each.value.Actions
    not_actions      = each.value.NotActions
    data_actions     = each.value.DataActions
    not_data_actions = each.value.NotDataActions
  }
  assignable_scopes = [data.azurerm_resource_group.ml.id]
}

# Airflow's role where each part of it applies, never on the resource group: Azure ML at the workspace, the landing
# queue and its poison queue ...
resource "azurerm_role_assignment" "airflow" {
  for_each = {
    workspace = local.workspace
    queue     = azurerm_storage_queue.landing.resource_manager_id
    poison    = azurerm_storage_queue.landing_poison.resource_manager_id
  }
  scope              = each.value
  role_definition_id = azurerm_role_definition.mlfactory["airflow"].role_definition_resource_id
  principal_id       = var.airflow_principal_id
}

# ... and the bucket's container, where it creates the raw snapshots and the frozen holdout once (blobs/add/action)
# and never overwrites or deletes them (blobs/write, blobs/delete), but for the ingest's ledger beside them
resource "azurerm_role_assignment" "airflow_bucket" {
  scope              = azurerm_storage_container.bucket.id
  role_definition_id = azurerm_role_definition.mlfactory["airflow"].role_definition_resource_id
  principal_id       = var.airflow_principal_id
  condition_version  = "2.0"
  condition          = <<-EOT
    (
     (
      !(ActionMatches{'${local.blobs}/write'})
      AND
      !(ActionMatches{'${local.blobs}/delete'})
     )
     OR
     (${join(" AND ", [for prefix in local.prefixes.airflow.write_once : "@Resource[${local.blobs}:path] StringNotStartsWith '${prefix}'"])})
     OR
     (${local.under.airflow.write_once_except})
    )
  EOT
}

# The one assignment on the resource group: autoscale settings and alert rules are resources of the group, not of
# the workspace, and this role holds Microsoft.Insights actions alone
resource "azurerm_role_assignment" "airflow_monitor" {
  scope              = data.azurerm_resource_group.ml.id
  role_definition_id = azurerm_role_definition.mlfactory["airflow-monitor"].role_definition_resource_id
  principal_id       = var.airflow_principal_id
}

# Each job identity reads its own prefixes (any listing: a list has no blob path) and writes its own, never raw/, the
# holdout or the registry's mlflow/, which the MLflow server writes (deploy/bucket-prefixes.yaml)
resource "azurerm_role_assignment" "jobs" {
  for_each           = azurerm_user_assigned_identity.jobs
  scope              = azurerm_storage_container.bucket.id
  role_definition_id = azurerm_role_definition.mlfactory["jobs"].role_definition_resource_id
  principal_id       = each.value.principal_id
  condition_version  = "2.0"
  condition          = <<-EOT
    (
     (
      !(ActionMatches{'${local.blobs}/read'} AND NOT SubOperationMatches{'Blob.List'})
     )
     OR
     (${local.under[each.key].read})
    )
    AND
    (
     (
      !(ActionMatches{'${local.blobs}/write'})
     )
     OR
     (${local.under[each.key].write})
    )
  EOT
}

# --- spend ---------------------------------------------------------------------------------------------

resource "azurerm_consumption_budget_resource_group" "mlfactory" {
  name              = "mlfactory-monthly"
  resource_group_id = data.azurerm_resource_group.ml.id
  amount            = var.monthly_budget_usd
  time_grain        = "Monthly"
  time_period {
    start_date = var.budget_start_date
  }
  notification {
    enabled        = true
    threshold      = 80
    operator       = "GreaterThan"
    threshold_type = "Forecasted"
    contact_emails = [var.alert_email]
  }
}
