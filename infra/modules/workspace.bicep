// The Azure ML workspace, tied to its storage account, Key Vault, Application Insights and
// container registry. System datastores use the workspace's managed identity (no account keys),
// which is what lets the storage account keep shared-key access off.

@description('Azure region.')
param location string

@description('Workspace name (exported to the workflows as AZURE_WORKSPACE_NAME).')
param workspaceName string

param storageAccountId string
param keyVaultId string
param appInsightsId string
param registryId string

@description('Enabled: reachable from GitHub-hosted runners; Disabled needs private endpoints and self-hosted runners.')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

@description('Log Analytics workspace that receives the workspace logs.')
param logAnalyticsId string

@description('Tags for every resource.')
param tags object = {}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' = {
  //checkov:skip=CKV_AZURE_243: Public network access is a parameter (publicNetworkAccess): GitHub-hosted runners submit jobs over the public endpoint with Entra ID; a private endpoint needs a virtual network and self-hosted runners.
  name: workspaceName
  location: location
  tags: tags
  sku: {
    name: 'Basic'
    tier: 'Basic'
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    friendlyName: workspaceName
    storageAccount: storageAccountId
    keyVault: keyVaultId
    applicationInsights: appInsightsId
    containerRegistry: registryId
    publicNetworkAccess: publicNetworkAccess
    systemDatastoresAuthMode: 'identity'
    v1LegacyMode: false
    hbiWorkspace: false
  }
}

resource workspaceDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: workspace
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
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output workspaceId string = workspace.id
output workspaceName string = workspace.name
output workspacePrincipalId string = workspace.identity.principalId
