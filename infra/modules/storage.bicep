// The storage account: the Azure ML workspace's default store and the DVC remote (one container).
// Entra ID only: shared keys and SAS signed with them are off, so DVC authenticates with
// `az login`, a managed identity or the GitHub OIDC identity (dvc-azure's default credential chain).

@description('Azure region.')
param location string

@description('Storage account name: 3-24 lowercase letters and digits, globally unique.')
@minLength(3)
@maxLength(24)
param storageAccountName string

@description('Blob container that holds the DVC cache (params.yaml azure.storage.dvc_container).')
param dvcContainerName string

@description('Replication. Standard_ZRS survives a zone outage; Standard_LRS (dev.bicepparam) is the cheapest.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_RAGRS'
  'Standard_GZRS'
])
param skuName string = 'Standard_ZRS'

@description('Days a deleted blob or container can be restored.')
@minValue(1)
@maxValue(365)
param softDeleteDays int = 14

@description('Log Analytics workspace that receives the diagnostic logs.')
param logAnalyticsId string

@description('Tags for every resource.')
param tags object = {}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  //checkov:skip=CKV_AZURE_59: Public endpoint kept so GitHub-hosted runners (no fixed IPs) can dvc pull/push; every request needs an Entra ID token and an RBAC role (shared keys are off). Set publicNetworkAccess Disabled with private endpoints and self-hosted runners to close it.
  //checkov:skip=CKV_AZURE_35: Firewall default action Allow for the same reason: GitHub-hosted runners have no fixed IP range to allow-list.
  //checkov:skip=CKV_AZURE_206: Replication is a parameter: zone-redundant (Standard_ZRS) by default, locally redundant in dev; geo-replication (Standard_GZRS) roughly doubles the storage bill, so it is the operator's choice.
  //checkov:skip=CKV_AZURE_43: The name is a parameter (params.yaml azure.storage.account_name, length-checked by @minLength/@maxLength here); the check cannot evaluate parameters.
  name: storageAccountName
  location: location
  tags: tags
  sku: {
    name: skuName
  }
  kind: 'StorageV2'
  properties: {
    accessTier: 'Hot'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
        file: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteDays
    }
  }
}

resource dvcContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: dvcContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Account-level transaction metrics, and read/write/delete logs of the blob service.
resource storageDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: storage
  properties: {
    workspaceId: logAnalyticsId
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

resource blobDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: blobService
  properties: {
    workspaceId: logAnalyticsId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

output storageAccountId string = storage.id
output storageAccountName string = storage.name
output dvcContainerId string = dvcContainer.id
output dvcContainerName string = dvcContainer.name
output blobEndpoint string = storage.properties.primaryEndpoints.blob
