// Role assignments, each at the narrowest scope that works:
//   cluster identity  -> Storage Blob Data Contributor on the DVC container (dvc pull/push in jobs)
//                        and on the account (job inputs/outputs in the workspace's default datastore)
//                        Key Vault Secrets User on the vault (the Hugging Face token for gated Llama weights,
//                        params.yaml azure.secrets.hf_token_secret_name)
//   CI identity       -> Storage Blob Data Contributor on the DVC container (dvc pull/push in CI)
//                        AzureML Data Scientist on the workspace (submit jobs, register models,
//                        roll out deployments; it cannot change the workspace or its compute)
//   workspace identity-> blob and file data access on its own storage account (identity-based
//                        system datastores; shared keys are off)
//   PR identity       -> Storage Blob Data Reader on the DVC container (dvc pull in pull requests)
//                        and the custom role "what-if reader" on the resource group: Reader plus
//                        deployments/whatIf and validate, so `what-if --validation-level
//                        ProviderNoRbac` works without any write permission
//   CI identity, only if ciCanDeployInfra -> Contributor on the resource group and Role Based
//                        Access Control Administrator limited (ABAC condition) to granting the
//                        two data roles above, so infra.yml can deploy this template on main.

param storageAccountName string
param dvcContainerName string
param workspaceName string
param keyVaultName string
param clusterPrincipalId string
param ciPrincipalId string
param prPrincipalId string
param workspacePrincipalId string

@description('Give the CI identity the rights to deploy this template (infra.yml on main).')
param ciCanDeployInfra bool = false

@description('Create the custom what-if role (needs Owner or User Access Administrator: the first, manual deployment). Later deployments reference it.')
param createWhatIfRole bool = false

var roles = {
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageBlobDataReader: '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  storageFileDataPrivilegedContributor: '69566ab7-960f-475b-8e7c-b3118f30c6bd'
  azureMLDataScientist: 'f6c7c914-8db3-469d-8ca1-694a8f32e121'
  contributor: 'b24988ac-6180-42a0-ab88-20f7382dd24c'
  rbacAdministrator: 'f58310d9-a9f6-439a-9e8d-f62e7b41a168'
}

// The RBAC administrator may only create or delete assignments of the data roles it needs.
var grantableRoles = '${roles.storageBlobDataContributor}, ${roles.storageFileDataPrivilegedContributor}, ${roles.azureMLDataScientist}'
var rbacCondition = '((!(ActionMatches{\'Microsoft.Authorization/roleAssignments/write\'})) OR (@Request[Microsoft.Authorization/roleAssignments:RoleDefinitionId] ForAnyOfAnyValues:GuidEquals {${grantableRoles}})) AND ((!(ActionMatches{\'Microsoft.Authorization/roleAssignments/delete\'})) OR (@Resource[Microsoft.Authorization/roleAssignments:RoleDefinitionId] ForAnyOfAnyValues:GuidEquals {${grantableRoles}}))'

// Reader plus the two deployment actions what-if and validate need; nothing that writes.
var whatIfRoleName = guid(subscription().id, resourceGroup().id, 'bicep-what-if-reader')

resource whatIfRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = if (createWhatIfRole) {
  name: whatIfRoleName
  properties: {
    roleName: 'Bicep what-if reader ${subscription().subscriptionId}/${resourceGroup().name}'
    description: 'Read everything in the resource group and run deployment what-if/validate (--validation-level ProviderNoRbac); no write.'
    type: 'customRole'
    permissions: [
      {
        actions: [
          '*/read'
          'Microsoft.Resources/deployments/whatIf/action'
          'Microsoft.Resources/deployments/validate/action'
        ]
        notActions: []
      }
    ]
    assignableScopes: [
      resourceGroup().id
    ]
  }
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource dvcContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: dvcContainerName
}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' existing = {
  name: workspaceName
}

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource clusterSecrets 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(keyVault.id, clusterPrincipalId, roles.keyVaultSecretsUser)
  scope: keyVault
  properties: {
    principalId: clusterPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    description: 'Training cluster: read the Hugging Face token secret for gated Llama weights'
  }
}

resource clusterDvc 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(dvcContainer.id, clusterPrincipalId, roles.storageBlobDataContributor)
  scope: dvcContainer
  properties: {
    principalId: clusterPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    description: 'Training cluster: dvc pull/push on the DVC remote'
  }
}

resource clusterWorkspaceStore 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, clusterPrincipalId, roles.storageBlobDataContributor)
  scope: storage
  properties: {
    principalId: clusterPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    description: 'Training cluster: job inputs and outputs in the identity-based workspace datastores'
  }
}

resource ciDvc 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(dvcContainer.id, ciPrincipalId, roles.storageBlobDataContributor)
  scope: dvcContainer
  properties: {
    principalId: ciPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    description: 'GitHub Actions: dvc pull/push on the DVC remote'
  }
}

resource ciDataScientist 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, ciPrincipalId, roles.azureMLDataScientist)
  scope: workspace
  properties: {
    principalId: ciPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.azureMLDataScientist)
    description: 'GitHub Actions: submit training jobs, register models, roll out endpoint deployments'
  }
}

resource workspaceBlob 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, workspacePrincipalId, roles.storageBlobDataContributor)
  scope: storage
  properties: {
    principalId: workspacePrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    description: 'Workspace: identity-based access to its system datastores (blob)'
  }
}

resource workspaceFile 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, workspacePrincipalId, roles.storageFileDataPrivilegedContributor)
  scope: storage
  properties: {
    principalId: workspacePrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageFileDataPrivilegedContributor)
    description: 'Workspace: identity-based access to its system datastores (file share)'
  }
}

resource prDvc 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(dvcContainer.id, prPrincipalId, roles.storageBlobDataReader)
  scope: dvcContainer
  properties: {
    principalId: prPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataReader)
    description: 'GitHub Actions pull requests: dvc pull (read only)'
  }
}

resource prWhatIf 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, prPrincipalId, whatIfRoleName)
  properties: {
    principalId: prPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', whatIfRoleName)
    description: 'GitHub Actions pull requests: read-only what-if of infra/main.bicep'
  }
  dependsOn: [
    whatIfRole
  ]
}

resource ciContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (ciCanDeployInfra) {
  name: guid(resourceGroup().id, ciPrincipalId, roles.contributor)
  properties: {
    principalId: ciPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.contributor)
    description: 'GitHub Actions: what-if and deploy infra/main.bicep in this resource group'
  }
}

resource ciRbacAdmin 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (ciCanDeployInfra) {
  name: guid(resourceGroup().id, ciPrincipalId, roles.rbacAdministrator)
  properties: {
    principalId: ciPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.rbacAdministrator)
    description: 'GitHub Actions: (re)create the data-role assignments of this template, nothing else'
    conditionVersion: '2.0'
    condition: rbacCondition
  }
}
