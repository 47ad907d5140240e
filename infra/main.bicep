// The whole Azure footprint of the repository in one resource-group deployment:
//   Log Analytics + Application Insights, storage account (+ DVC container), Key Vault, container
//   registry, Azure ML workspace, H100 training cluster, managed online endpoint (+ autoscale of
//   its live deployment), the GitHub Actions identity (OIDC) and the role assignments.
//
// Names and sizes come from params.yaml `azure:` (the single source of truth of the Python side);
// dev.bicepparam and prod.bicepparam repeat them and tests/test_infra.py checks that they agree.
//
//   az deployment group what-if --resource-group <rg> --parameters infra/dev.bicepparam
//   az deployment group create  --resource-group <rg> --parameters infra/dev.bicepparam
targetScope = 'resourceGroup'

// ---- environment -------------------------------------------------------------------------

@description('params.yaml azure.location (a region with H100 quota).')
param location string = 'uksouth'

@description('Environment suffix of every resource name.')
@allowed([
  'dev'
  'prod'
])
param environmentName string

@description('Short name of the product, used in resource names (lowercase letters and digits).')
@minLength(3)
@maxLength(10)
param baseName string = 'llamaqa'

@description('GitHub repository (owner/name) whose workflows sign in with OIDC.')
param githubRepository string

@description('GitHub environments whose jobs may sign in as the CI identity (train jobs, submit, deploy).')
param githubEnvironments array


@description('Let the CI identity deploy this template (Contributor + a role-limited RBAC administrator on the resource group).')
param ciCanDeployInfra bool = false

@description('Create the custom what-if role of the pull-request identity. Needs Owner or User Access Administrator, so true only for the first, manual deployment (CREATE_WHATIF_ROLE=true).')
param createWhatIfRole bool = false

// ---- training cluster: params.yaml azure.compute ----------------------------------------

param clusterName string = 'llama-h100-cluster'
param clusterVmSize string = 'Standard_NC40ads_H100_v5'
@minValue(0)
param clusterMinNodes int = 0
@minValue(1)
param clusterMaxNodes int = 4
@minValue(0)
param clusterIdleSecondsBeforeScaleDown int = 300
@allowed([
  'dedicated'
  'low_priority'
])
param clusterTier string = 'dedicated'

// ---- online endpoint: params.yaml azure.endpoint -----------------------------------------

param endpointName string = 'llama-corporate-qa'
@allowed([
  'aml_token'
  'key'
  'aad_token'
])
param endpointAuthMode string = 'aml_token'
@allowed([
  'enabled'
  'disabled'
])
param endpointPublicNetworkAccess string = 'enabled'
param endpointInstanceType string = 'Standard_NC4as_T4_v3'
@minValue(1)
param endpointInstanceCount int = 1
@minValue(1)
param endpointMinInstances int = 1
@minValue(1)
param endpointMaxInstances int = 10

@description('Live deployment that autoscale targets (blue or green); empty before the first rollout.')
param autoscaleDeploymentName string = ''

// ---- storage: params.yaml azure.storage ----------------------------------------------------

@description('params.yaml azure.storage.account_name (3-24 lowercase letters and digits, globally unique).')
@minLength(3)
@maxLength(24)
param storageAccountName string

param dvcContainerName string = 'dvc'

@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_RAGRS'
  'Standard_GZRS'
])
param storageSku string = 'Standard_ZRS'

@allowed([
  'Basic'
  'Standard'
  'Premium'
])
param registrySku string = 'Basic'

@allowed([
  'Enabled'
  'Disabled'
])
param workspacePublicNetworkAccess string = 'Enabled'

param tags object = {
  product: 'llama-finetune'
  environment: environmentName
  managedBy: 'bicep'
}

// ---- names -------------------------------------------------------------------------------

var suffix = uniqueString(resourceGroup().id, baseName, environmentName)
var names = {
  logAnalytics: 'log-${baseName}-${environmentName}'
  appInsights: 'appi-${baseName}-${environmentName}'
  keyVault: take('kv-${baseName}-${environmentName}-${suffix}', 24)
  registry: take(toLower('cr${baseName}${environmentName}${suffix}'), 50)
  workspace: 'mlw-${baseName}-${environmentName}'
  ciIdentity: 'id-github-${baseName}-${environmentName}'
  prIdentity: 'id-github-pr-${baseName}-${environmentName}'
}

// ---- resources ---------------------------------------------------------------------------

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    location: location
    logAnalyticsName: names.logAnalytics
    appInsightsName: names.appInsights
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    location: location
    storageAccountName: storageAccountName
    dvcContainerName: dvcContainerName
    skuName: storageSku
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    tags: tags
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    location: location
    keyVaultName: names.keyVault
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    tags: tags
  }
}

module registry 'modules/registry.bicep' = {
  name: 'registry'
  params: {
    location: location
    registryName: names.registry
    skuName: registrySku
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    tags: tags
  }
}

module workspace 'modules/workspace.bicep' = {
  name: 'workspace'
  params: {
    location: location
    workspaceName: names.workspace
    storageAccountId: storage.outputs.storageAccountId
    keyVaultId: keyVault.outputs.keyVaultId
    appInsightsId: monitoring.outputs.appInsightsId
    registryId: registry.outputs.registryId
    publicNetworkAccess: workspacePublicNetworkAccess
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    tags: tags
  }
}

module compute 'modules/compute.bicep' = {
  name: 'compute'
  params: {
    location: location
    workspaceName: workspace.outputs.workspaceName
    clusterName: clusterName
    vmSize: clusterVmSize
    minNodes: clusterMinNodes
    maxNodes: clusterMaxNodes
    idleSecondsBeforeScaleDown: clusterIdleSecondsBeforeScaleDown
    tier: clusterTier
    tags: tags
  }
}

module endpoint 'modules/endpoint.bicep' = {
  name: 'endpoint'
  params: {
    location: location
    workspaceName: workspace.outputs.workspaceName
    endpointName: endpointName
    authMode: endpointAuthMode
    publicNetworkAccess: endpointPublicNetworkAccess
    instanceType: endpointInstanceType
    instanceCount: endpointInstanceCount
    minInstances: endpointMinInstances
    maxInstances: endpointMaxInstances
    autoscaleDeploymentName: autoscaleDeploymentName
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    tags: tags
  }
}

module githubIdentity 'modules/github-identity.bicep' = {
  name: 'github-identity'
  params: {
    location: location
    identityName: names.ciIdentity
    githubRepository: githubRepository
    subjects: [for env in githubEnvironments: 'environment:${env}']
    tags: tags
  }
}

// Pull-request jobs (dvc pull, what-if) sign in as a separate, read-only identity.
module githubPullRequestIdentity 'modules/github-identity.bicep' = {
  name: 'github-pr-identity'
  params: {
    location: location
    identityName: names.prIdentity
    githubRepository: githubRepository
    subjects: [
      'pull_request'
    ]
    tags: tags
  }
}

module roles 'modules/roles.bicep' = {
  name: 'roles'
  params: {
    storageAccountName: storage.outputs.storageAccountName
    dvcContainerName: storage.outputs.dvcContainerName
    workspaceName: workspace.outputs.workspaceName
    keyVaultName: keyVault.outputs.keyVaultName
    clusterPrincipalId: compute.outputs.clusterPrincipalId
    ciPrincipalId: githubIdentity.outputs.principalId
    prPrincipalId: githubPullRequestIdentity.outputs.principalId
    workspacePrincipalId: workspace.outputs.workspacePrincipalId
    ciCanDeployInfra: ciCanDeployInfra
    createWhatIfRole: createWhatIfRole
  }
}

// ---- outputs: GitHub environment variables and .dvc/config ---------------------------------
// `python -m stages.ci.infra_outputs` turns these into `gh variable set` and `dvc remote` commands.

output subscriptionId string = subscription().subscriptionId
output tenantId string = subscription().tenantId
output resourceGroupName string = resourceGroup().name
output location string = location
output workspaceName string = workspace.outputs.workspaceName
output clusterName string = compute.outputs.clusterName
output endpointName string = endpoint.outputs.endpointName
output storageAccountName string = storage.outputs.storageAccountName
output dvcContainerName string = storage.outputs.dvcContainerName
output dvcRemoteUrl string = 'azure://${storage.outputs.dvcContainerName}'
output ciIdentityClientId string = githubIdentity.outputs.clientId
output prIdentityClientId string = githubPullRequestIdentity.outputs.clientId
output keyVaultName string = keyVault.outputs.keyVaultName
output registryName string = registry.outputs.registryName
