// The training cluster (params.yaml azure.compute): H100 nodes that scale to zero when idle, so
// the cluster costs nothing at rest. Its system-assigned identity reads and writes the DVC remote.

@description('Azure region.')
param location string

@description('Existing Azure ML workspace.')
param workspaceName string

@description('params.yaml azure.compute.cluster_name')
param clusterName string

@description('params.yaml azure.compute.vm_size')
param vmSize string

@description('params.yaml azure.compute.min_nodes (0 = no cost at rest)')
@minValue(0)
param minNodes int

@description('params.yaml azure.compute.max_nodes')
@minValue(1)
param maxNodes int

@description('params.yaml azure.compute.idle_seconds_before_scale_down')
@minValue(0)
param idleSecondsBeforeScaleDown int

@description('params.yaml azure.compute.tier: dedicated, or low_priority (cheaper, can be pre-empted mid-run).')
@allowed([
  'dedicated'
  'low_priority'
])
param tier string = 'dedicated'

@description('Tags for every resource.')
param tags object = {}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' existing = {
  name: workspaceName
}

resource cluster 'Microsoft.MachineLearningServices/workspaces/computes@2024-10-01' = {
  parent: workspace
  name: clusterName
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    computeType: 'AmlCompute'
    description: 'LoRA/QLoRA fine-tuning of Llama 3.x (scales to zero when idle)'
    disableLocalAuth: true
    properties: {
      vmSize: vmSize
      vmPriority: (tier == 'low_priority') ? 'LowPriority' : 'Dedicated'
      osType: 'Linux'
      scaleSettings: {
        minNodeCount: minNodes
        maxNodeCount: maxNodes
        // An ISO 8601 duration: 300 seconds is PT300S.
        nodeIdleTimeBeforeScaleDown: 'PT${idleSecondsBeforeScaleDown}S'
      }
      // No SSH port on the nodes.
      remoteLoginPortPublicAccess: 'Disabled'
    }
  }
}

output clusterId string = cluster.id
output clusterName string = cluster.name
output clusterPrincipalId string = cluster.identity.principalId
