// The identity GitHub Actions signs in as: a user-assigned managed identity with one federated
// credential per GitHub environment (OIDC). No client secret exists anywhere; a workflow job that
// declares `environment: <name>` in repository <githubRepository> receives a token for it.

@description('Azure region.')
param location string

@description('Identity name.')
param identityName string

@description('GitHub repository as owner/name.')
param githubRepository string

@description('GitHub environments whose jobs may sign in (for example dev, or train and prod).')
@minLength(1)
param githubEnvironments array

@description('Tags for every resource.')
param tags object = {}

resource ciIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: identityName
  location: location
  tags: tags
}

// Federated credentials of one identity cannot be written concurrently: one at a time.
@batchSize(1)
resource federated 'Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials@2023-01-31' = [for env in githubEnvironments: {
  parent: ciIdentity
  name: 'github-${env}'
  properties: {
    issuer: 'https://token.actions.githubusercontent.com'
    subject: 'repo:${githubRepository}:environment:${env}'
    audiences: [
      'api://AzureADTokenExchange'
    ]
  }
}]

output identityId string = ciIdentity.id
output clientId string = ciIdentity.properties.clientId
output principalId string = ciIdentity.properties.principalId
