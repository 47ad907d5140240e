// Key Vault of the Azure ML workspace: RBAC authorisation (no access policies), soft delete and
// purge protection (a deleted vault and its secrets stay recoverable for the retention period).
// Holds the Hugging Face token for gated Llama weights (params.yaml azure.secrets).

@description('Azure region.')
param location string

@description('Key Vault name: 3-24 letters, digits and hyphens, globally unique.')
@minLength(3)
@maxLength(24)
param keyVaultName string

@description('Days a deleted vault or secret can be recovered (7-90).')
@minValue(7)
@maxValue(90)
param softDeleteRetentionDays int = 90

@description('Log Analytics workspace that receives the audit logs.')
param logAnalyticsId string

@description('Tags for every resource.')
param tags object = {}

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  //checkov:skip=CKV_AZURE_189: The training cluster has no virtual network, so its managed identity reaches the vault over the public endpoint (RBAC-only access, no access policies); closing it needs a VNet-injected cluster and a private endpoint.
  //checkov:skip=CKV_AZURE_109: Firewall default Allow for the same reason: cluster nodes use public Azure addresses that the trusted-services bypass does not cover; every secret read needs Entra ID and the Key Vault Secrets User role.
  name: keyVaultName
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: softDeleteRetentionDays
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: 'Enabled'
    // Allow: the training cluster (no virtual network) reads the Hugging Face token with its
    // managed identity from public Azure addresses that the trusted-services bypass does not
    // cover. Every read still needs an Entra ID token and an RBAC role (Key Vault Secrets User).
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource keyVaultDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: keyVault
  properties: {
    workspaceId: logAnalyticsId
    logs: [
      {
        categoryGroup: 'audit'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output keyVaultId string = keyVault.id
output keyVaultName string = keyVault.name
