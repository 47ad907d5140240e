// An identity GitHub Actions signs in as: a user-assigned managed identity with one federated
// credential (OIDC) per token subject. No client secret exists anywhere. Subjects, after
// `repo:<owner>/<name>:`: `environment:<name>` for a job that declares that GitHub environment,
// `pull_request` for a pull-request job (GitHub gives fork pull requests no OIDC token at all).

@description('Azure region.')
param location string

@description('Identity name.')
param identityName string

@description('GitHub repository as owner/name.')
param githubRepository string

@description('Token subjects after repo:<owner>/<name>: (environment:prod, pull_request, ...).')
@minLength(1)
param subjects array

@description('Tags for every resource.')
param tags object = {}

resource ciIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: identityName
  location: location
  tags: tags
}

// Federated credentials of one identity cannot be written concurrently: one at a time.
@batchSize(1)
resource federated 'Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials@2023-01-31' = [for subject in subjects: {
  parent: ciIdentity
  name: 'github-${replace(subject, ':', '-')}'
  properties: {
    issuer: 'https://token.actions.githubusercontent.com'
    subject: 'repo:${githubRepository}:${subject}'
    audiences: [
      'api://AzureADTokenExchange'
    ]
  }
}]

output identityId string = ciIdentity.id
output clientId string = ciIdentity.properties.clientId
output principalId string = ciIdentity.properties.principalId
