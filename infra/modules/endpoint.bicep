// The managed online endpoint (params.yaml azure.endpoint) and the autoscale setting of its live
// deployment. Deployments themselves (blue/green, with a registered model) are created by the
// deploy workflow (`python -m stages.azure.endpoints deploy`), not here: a deployment needs a model.

@description('Azure region.')
param location string

@description('Existing Azure ML workspace.')
param workspaceName string

@description('params.yaml azure.endpoint.name (unique within the Azure region).')
param endpointName string

@description('params.yaml azure.endpoint.auth_mode: aml_token (short-lived Entra-issued tokens), key, or aad_token.')
@allowed([
  'aml_token'
  'key'
  'aad_token'
])
param authMode string

@description('params.yaml azure.endpoint.public_network_access')
@allowed([
  'enabled'
  'disabled'
])
param publicNetworkAccess string

@description('Deployment the autoscale setting targets; empty = no autoscale yet (before the first rollout).')
param autoscaleDeploymentName string = ''

@description('params.yaml azure.endpoint.instance_type: picks the autoscale metric (GPU or CPU utilisation).')
param instanceType string

@description('params.yaml azure.endpoint.instance_count: the capacity autoscale starts from.')
@minValue(1)
param instanceCount int

@description('params.yaml azure.endpoint.min_instances')
@minValue(1)
param minInstances int

@description('params.yaml azure.endpoint.max_instances')
@minValue(1)
param maxInstances int

@description('Scale out above this average utilisation (percent) over 10 minutes.')
param scaleOutAbovePercent int = 70

@description('Scale in below this average utilisation (percent) over 10 minutes.')
param scaleInBelowPercent int = 25

@description('Log Analytics workspace that receives the endpoint logs.')
param logAnalyticsId string

@description('Tags for every resource.')
param tags object = {}

// params.yaml spells values the way the Azure ML SDK does; ARM wants these spellings.
var armAuthModes = {
  aml_token: 'AMLToken'
  key: 'Key'
  aad_token: 'AADToken'
}
var armNetworkAccess = {
  enabled: 'Enabled'
  disabled: 'Disabled'
}
// GPU SKUs (NC*, ND*, NV*) scale on GPU utilisation; CPU SKUs on CPU utilisation.
var gpuInstance = startsWith(toLower(instanceType), 'standard_n')
var scaleMetric = gpuInstance ? 'GpuUtilizationPercentage' : 'CpuUtilizationPercentage'

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' existing = {
  name: workspaceName
}

resource endpoint 'Microsoft.MachineLearningServices/workspaces/onlineEndpoints@2024-10-01' = {
  parent: workspace
  name: endpointName
  location: location
  tags: tags
  kind: 'Managed'
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    description: 'Llama 3.x corporate Q&A assistant (LoRA fine-tune)'
    authMode: armAuthModes[authMode]
    publicNetworkAccess: armNetworkAccess[publicNetworkAccess]
  }
}

resource endpointDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: endpoint
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

var deploymentId = resourceId('Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments', workspaceName, endpointName, autoscaleDeploymentName)

// Azure Monitor autoscale of the live deployment: +1 instance when utilisation stays high,
// -1 when it stays low, within [minInstances, maxInstances]. One setting per colour (its target
// never changes); deploy.yml deletes the setting of a colour that no longer serves.
resource autoscale 'Microsoft.Insights/autoscalesettings@2022-10-01' = if (!empty(autoscaleDeploymentName)) {
  name: 'autoscale-${endpointName}-${autoscaleDeploymentName}'
  location: location
  tags: tags
  properties: {
    name: 'autoscale-${endpointName}-${autoscaleDeploymentName}'
    enabled: true
    targetResourceUri: deploymentId
    profiles: [
      {
        name: 'utilisation'
        capacity: {
          minimum: string(minInstances)
          maximum: string(maxInstances)
          default: string(instanceCount)
        }
        rules: [
          {
            metricTrigger: {
              metricName: scaleMetric
              metricResourceUri: deploymentId
              timeGrain: 'PT1M'
              statistic: 'Average'
              timeWindow: 'PT10M'
              timeAggregation: 'Average'
              operator: 'GreaterThan'
              threshold: scaleOutAbovePercent
            }
            scaleAction: {
              direction: 'Increase'
              type: 'ChangeCount'
              value: '1'
              cooldown: 'PT5M'
            }
          }
          {
            metricTrigger: {
              metricName: scaleMetric
              metricResourceUri: deploymentId
              timeGrain: 'PT1M'
              statistic: 'Average'
              timeWindow: 'PT10M'
              timeAggregation: 'Average'
              operator: 'LessThan'
              threshold: scaleInBelowPercent
            }
            scaleAction: {
              direction: 'Decrease'
              type: 'ChangeCount'
              value: '1'
              cooldown: 'PT10M'
            }
          }
        ]
      }
    ]
  }
}

output endpointId string = endpoint.id
output endpointName string = endpoint.name
output endpointPrincipalId string = endpoint.identity.principalId
output scoringUri string = endpoint.properties.scoringUri
