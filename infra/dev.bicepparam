// Development environment: a sandbox for infrastructure and Azure ML changes, with its own
// workspace and DVC storage. Its jobs sign in through the GitHub environment `dev`; pull-request
// jobs sign in as its read-only identity (repository variables AZURE_PR_CLIENT_ID_DEV, ...).
//   az deployment group create -g <dev-rg> --parameters infra/dev.bicepparam
// Values marked "params.yaml" must equal the `azure:` section there (tests/test_infra.py checks).
using 'main.bicep'

param environmentName = 'dev'
param githubRepository = readEnvironmentVariable('GITHUB_REPOSITORY', 'your-org/llama-finetune')
param githubEnvironments = [
  'dev'
]
param ciCanDeployInfra = true
// true only for the first, manual deployment (Owner): CREATE_WHATIF_ROLE=true az deployment group create ...
param createWhatIfRole = bool(readEnvironmentVariable('CREATE_WHATIF_ROLE', 'false'))

param location = 'uksouth'                                // params.yaml azure.location

param clusterName = 'llama-h100-cluster'                  // params.yaml azure.compute.cluster_name
param clusterVmSize = 'Standard_NC40ads_H100_v5'          // params.yaml azure.compute.vm_size
param clusterMinNodes = 0                                 // params.yaml azure.compute.min_nodes
param clusterMaxNodes = 4                                 // params.yaml azure.compute.max_nodes
param clusterIdleSecondsBeforeScaleDown = 300             // params.yaml azure.compute.idle_seconds_before_scale_down
param clusterTier = 'dedicated'// params.yaml azure.compute.tier

param endpointName = 'llama-corporate-qa-dev'             // params.yaml azure.endpoint.name + '-dev' (names are unique per region)
param endpointAuthMode = 'aml_token'                      // params.yaml azure.endpoint.auth_mode
param endpointPublicNetworkAccess = 'enabled'             // params.yaml azure.endpoint.public_network_access
param endpointInstanceType = 'Standard_NC4as_T4_v3'       // params.yaml azure.endpoint.instance_type
param endpointInstanceCount = 1                           // params.yaml azure.endpoint.instance_count
param endpointMinInstances = 1                            // params.yaml azure.endpoint.min_instances
param endpointMaxInstances = 10                           // params.yaml azure.endpoint.max_instances
param autoscaleDeploymentName = readEnvironmentVariable('AUTOSCALE_DEPLOYMENT', '')

param storageAccountName = 'llamacorpqadvcdev'            // params.yaml azure.storage.account_name + 'dev' (names are global)
param dvcContainerName = 'dvc'                            // params.yaml azure.storage.dvc_container

param storageSku = 'Standard_LRS'
param registrySku = 'Basic'
