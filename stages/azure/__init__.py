"""Azure ML for the DVC graph: training jobs on the H100 cluster, the managed online endpoint with
blue/green rollout, batch scoring, and the Azure Blob DVC remote. Every name and size comes from
params.yaml `azure:`; subscription, resource group and workspace from the environment."""
