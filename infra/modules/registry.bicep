// Container registry of the Azure ML workspace (training and serving environment images).
// Admin user off: the workspace, the cluster and the endpoint pull with their managed identities.

@description('Azure region.')
param location string

@description('Registry name: 5-50 letters and digits, globally unique.')
@minLength(5)
@maxLength(50)
param registryName string

@description('Basic is enough for a few environment images; Premium adds private endpoints, retention, geo-replication.')
@allowed([
  'Basic'
  'Standard'
  'Premium'
])
param skuName string = 'Basic'

@description('Log Analytics workspace that receives the registry logs.')
param logAnalyticsId string

@description('Tags for every resource.')
param tags object = {}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  //checkov:skip=CKV_AZURE_139: Disabling public networking needs the Premium SKU and private endpoints; Azure ML builds and pulls environment images over the public endpoint with Entra ID (admin user and anonymous pull are off).
  //checkov:skip=CKV_AZURE_163: Image vulnerability scanning is Microsoft Defender for Containers, a subscription-level plan, not a registry property.
  //checkov:skip=CKV_AZURE_166: Quarantine is a Premium-only preview feature; the registry only holds images Azure ML builds from this repository's environment files.
  name: registryName
  location: location
  tags: tags
  sku: {
    name: skuName
  }
  properties: {
    adminUserEnabled: false
    anonymousPullEnabled: false
    publicNetworkAccess: 'Enabled'
  }
}

resource registryDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: registry
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

output registryId string = registry.id
output registryName string = registry.name
