// Log Analytics (the sink of every diagnostic setting) and workspace-based Application Insights
// (the Azure ML workspace's and the endpoint's request telemetry).

@description('Azure region.')
param location string

@description('Log Analytics workspace name.')
param logAnalyticsName string

@description('Application Insights component name.')
param appInsightsName string

@description('Days that logs are kept. 30 is the free-retention tier of Log Analytics.')
@minValue(30)
@maxValue(730)
param retentionDays int = 30

@description('Tags for every resource.')
param tags object = {}

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionDays
    features: {
      enableLogAccessUsingOnlyResourcePermissions: true
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    // Azure ML sends endpoint and job telemetry with the connection string (instrumentation key),
    // so local auth stays on; the data lands in the Log Analytics workspace above.
    DisableLocalAuth: false
    IngestionMode: 'LogAnalytics'
  }
}

output logAnalyticsId string = logAnalytics.id
output appInsightsId string = appInsights.id
