"""infra/: every Bicep file parses with pycep-parser (the parser checkov uses), the declared values
are the secure and cost-conscious ones, and the names and sizes agree with params.yaml `azure:`,
the single source of truth of the Python side."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from pycep import BicepParser

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))
PARAM_FILES = {p.stem: p for p in sorted(INFRA.glob("*.bicepparam"))}

ROLE_IDS = {  # Azure built-in role definition ids
    "storageBlobDataContributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "storageBlobDataReader": "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1",
    "storageFileDataPrivilegedContributor": "69566ab7-960f-475b-8e7c-b3118f30c6bd",
    "azureMLDataScientist": "f6c7c914-8db3-469d-8ca1-694a8f32e121",
    "keyVaultSecretsUser": "4633458b-17de-408a-b874-0445c86b69e6",
    "contributor": "b24988ac-6180-42a0-ab88-20f7382dd24c",
    "rbacAdministrator": "f58310d9-a9f6-439a-9e8d-f62e7b41a168",
}

_PARSER = BicepParser()
_CACHE: dict[Path, dict] = {}


def parse(path: Path) -> dict:
    if path not in _CACHE:
        _CACHE[path] = _PARSER.parse(file_path=path)
    return _CACHE[path]


def parse_bicepparam(path: Path) -> tuple[str, dict]:
    """A .bicepparam is `using '<file>'` plus `param name = value` lines. pycep has no grammar for
    it, so each `param x =` becomes `var x =` (same expression grammar) and the values come back
    from pycep's variables."""
    text = path.read_text()
    using = re.search(r"(?m)^using\s+'([^']+)'\s*$", text)
    assert using, f"{path.name}: no `using '<template>'` line"
    body = re.sub(r"(?m)^using\s+.*$", "", text)
    body = re.sub(r"(?m)^param\s+(\w+)\s*=", r"var \1 =", body)
    assert not re.search(r"(?m)^param\s", body), f"{path.name}: a param line that is not `param x = value`"
    parsed = _PARSER.parse(text=body)
    return using.group(1), {k: v["value"] for k, v in parsed.get("variables", {}).items()}


@pytest.fixture(scope="module")
def azure() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert "azure" in params, "params.yaml has no azure: section"
    return params["azure"]


def module(name: str) -> dict:
    return parse(INFRA / "modules" / f"{name}.bicep")


def body(res: dict) -> dict:
    """The resource's object, under a condition (`= if (...) {}`) or a loop (`[for ...]`) if any."""
    cfg = res["config"]
    return cfg["config"] if ("condition" in cfg or "loop_type" in cfg) and "config" in cfg else cfg


def resources_of_type(parsed: dict, rtype: str) -> dict[str, dict]:
    return {k: r for k, r in parsed.get("resources", {}).items() if r["type"] == rtype and not r["existing"]}


# ---------------------------------------------------------------------------------------------
# parsing


def test_infra_layout():
    names = {p.relative_to(INFRA).as_posix() for p in BICEP_FILES}
    assert "main.bicep" in names
    for mod in ("monitoring", "storage", "keyvault", "registry", "workspace", "compute", "endpoint",
                "github-identity", "roles"):
        assert f"modules/{mod}.bicep" in names
    assert set(PARAM_FILES) == {"dev", "prod"}


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_bicep_file_parses(path):
    parsed = parse(path)
    assert parsed.get("resources") or parsed.get("modules"), f"{path.name} declares nothing"


def test_main_modules_exist_and_receive_only_declared_params():
    main = parse(INFRA / "main.bicep")
    assert main["globals"]["scope"]["value"] == "resourceGroup"
    for name, mod in main["modules"].items():
        target = (INFRA / mod["detail"]["path"]).resolve()
        assert target.is_file(), f"module {name}: {mod['detail']['path']} does not exist"
        declared = parse(target).get("parameters", {})
        passed = mod["config"]["params"]
        unknown = set(passed) - set(declared)
        assert not unknown, f"module {name} passes undeclared params {sorted(unknown)}"
        missing = {p for p, d in declared.items() if "default" not in d} - set(passed)
        assert not missing, f"module {name} misses required params {sorted(missing)}"


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_bicepparam_files_parse_and_match_main(env):
    using, values = parse_bicepparam(PARAM_FILES[env])
    assert using == "main.bicep"
    declared = parse(INFRA / "main.bicep")["parameters"]
    unknown = set(values) - set(declared)
    assert not unknown, f"{env}.bicepparam sets params main.bicep does not declare: {sorted(unknown)}"
    required = {p for p, d in declared.items() if "default" not in d}
    assert required <= set(values), f"{env}.bicepparam misses {sorted(required - set(values))}"
    assert values["environmentName"] == env
    for key, val in values.items():  # allowed() decorators hold for literal values
        for dec in declared[key]["decorators"]:
            if dec["type"] == "allowed" and isinstance(val, str):
                assert val in dec["argument"], f"{env}.bicepparam {key}={val!r} not in {dec['argument']}"


# ---------------------------------------------------------------------------------------------
# agreement with params.yaml azure:


def _expected_from_params(azure: dict) -> dict:
    compute, endpoint, storage = azure["compute"], azure["endpoint"], azure["storage"]
    expected = {
        "location": azure["location"],
        "clusterName": compute["cluster_name"],
        "clusterVmSize": compute["vm_size"],
        "clusterMinNodes": compute["min_nodes"],
        "clusterMaxNodes": compute["max_nodes"],
        "clusterIdleSecondsBeforeScaleDown": compute["idle_seconds_before_scale_down"],
        "endpointName": endpoint["name"],
        "endpointAuthMode": endpoint["auth_mode"],
        "endpointPublicNetworkAccess": endpoint["public_network_access"],
        "endpointInstanceType": endpoint["instance_type"],
        "endpointInstanceCount": endpoint["instance_count"],
        "endpointMinInstances": endpoint["min_instances"],
        "endpointMaxInstances": endpoint["max_instances"],
        "dvcContainerName": storage["dvc_container"],
    }
    if "tier" in compute:
        expected["clusterTier"] = compute["tier"]
    if "account_name" in storage:
        expected["storageAccountName"] = storage["account_name"]
    return expected


def test_params_yaml_holds_the_reference_values(azure):
    """The template's settings (reference/llama-finetune-template.md): H100 nodes, 0-4 nodes,
    300 s idle, endpoint autoscale 1-10."""
    assert azure["compute"]["vm_size"] == "Standard_NC40ads_H100_v5"
    assert (azure["compute"]["min_nodes"], azure["compute"]["max_nodes"]) == (0, 4)
    assert azure["compute"]["idle_seconds_before_scale_down"] == 300
    assert (azure["endpoint"]["min_instances"], azure["endpoint"]["max_instances"]) == (1, 10)


def test_prod_bicepparam_equals_params_yaml(azure):
    _, values = parse_bicepparam(PARAM_FILES["prod"])
    for key, want in _expected_from_params(azure).items():
        assert key in values, f"prod.bicepparam does not set {key}"
        assert values[key] == want, f"prod.bicepparam {key}={values[key]!r}, params.yaml says {want!r}"


def test_dev_bicepparam_equals_params_yaml_except_global_names(azure):
    """Endpoint names are unique per region and storage account names globally, so the dev
    sandbox suffixes them; everything else is the same."""
    _, values = parse_bicepparam(PARAM_FILES["dev"])
    expected = _expected_from_params(azure)
    expected["endpointName"] = f"{azure['endpoint']['name']}-dev"
    if "storageAccountName" in expected:
        expected["storageAccountName"] = f"{azure['storage']['account_name']}dev"
    for key, want in expected.items():
        assert values.get(key) == want, f"dev.bicepparam {key}={values.get(key)!r}, expected {want!r}"


def test_main_bicep_defaults_equal_params_yaml(azure):
    declared = parse(INFRA / "main.bicep")["parameters"]
    expected = _expected_from_params(azure)
    expected.pop("storageAccountName", None)  # required param: no default on purpose
    for key, want in expected.items():
        assert declared[key].get("default") == want, f"main.bicep default {key}={declared[key].get('default')!r} != {want!r}"


def test_dvc_config_points_at_the_prod_storage(azure):
    text = (ROOT / ".dvc" / "config").read_text()
    url = re.search(r"(?m)^\s*url\s*=\s*(\S+)", text)
    assert url and url.group(1) == f"azure://{azure['storage']['dvc_container']}"
    _, values = parse_bicepparam(PARAM_FILES["prod"])
    account = re.search(r"(?m)^\s*account_name\s*=\s*(\S+)", text)
    if account:  # no account_name = the operator sets it locally from the deployment output
        assert account.group(1) == values["storageAccountName"]
    assert not re.search(r"(?m)^\s*(account_key|sas_token|connection_string)\s*=", text), "a secret in .dvc/config"


# ---------------------------------------------------------------------------------------------
# declared values


def test_compute_cluster_scales_to_zero_with_identity():
    parsed = module("compute")
    (cluster,) = resources_of_type(parsed, "Microsoft.MachineLearningServices/workspaces/computes").values()
    cfg = cluster["config"]
    assert cfg["identity"]["type"] == "SystemAssigned"
    props = cfg["properties"]
    assert props["computeType"] == "AmlCompute"
    assert props["disableLocalAuth"] is True
    inner = props["properties"]
    assert inner["vmSize"] == "vmSize" and inner["osType"] == "Linux"
    assert inner["remoteLoginPortPublicAccess"] == "Disabled"
    scale = inner["scaleSettings"]
    assert scale["minNodeCount"] == "minNodes" and scale["maxNodeCount"] == "maxNodes"
    # ISO 8601 duration, as the computes schema requires: 300 -> PT300S
    assert scale["nodeIdleTimeBeforeScaleDown"] == "PT${idleSecondsBeforeScaleDown}S"
    assert scale["nodeIdleTimeBeforeScaleDown"].replace("${idleSecondsBeforeScaleDown}", "300") == "PT300S"
    # main.bicep wires params.yaml values to exactly these module params
    wired = parse(INFRA / "main.bicep")["modules"]["compute"]["config"]["params"]
    assert wired["vmSize"] == "clusterVmSize"
    assert wired["minNodes"] == "clusterMinNodes" and wired["maxNodes"] == "clusterMaxNodes"
    assert wired["idleSecondsBeforeScaleDown"] == "clusterIdleSecondsBeforeScaleDown"


def test_storage_is_secure_by_default():
    parsed = module("storage")
    (account,) = resources_of_type(parsed, "Microsoft.Storage/storageAccounts").values()
    props = account["config"]["properties"]
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["allowBlobPublicAccess"] is False
    assert props["allowSharedKeyAccess"] is False
    assert props["supportsHttpsTrafficOnly"] is True
    assert props["defaultToOAuthAuthentication"] is True
    (blob,) = resources_of_type(parsed, "Microsoft.Storage/storageAccounts/blobServices").values()
    assert blob["config"]["properties"]["deleteRetentionPolicy"]["enabled"] is True
    assert blob["config"]["properties"]["containerDeleteRetentionPolicy"]["enabled"] is True
    (container,) = resources_of_type(parsed, "Microsoft.Storage/storageAccounts/blobServices/containers").values()
    assert container["config"]["name"] == "dvcContainerName"
    assert container["config"]["properties"]["publicAccess"] == "None"


def test_key_vault_uses_rbac_and_purge_protection():
    (vault,) = resources_of_type(module("keyvault"), "Microsoft.KeyVault/vaults").values()
    props = vault["config"]["properties"]
    assert props["enableRbacAuthorization"] is True
    assert props["enablePurgeProtection"] is True
    assert props["enableSoftDelete"] is True
    assert props["enabledForTemplateDeployment"] is False  # no secret leaves through ARM
    assert "accessPolicies" not in props


def test_registry_and_workspace_use_identities_not_keys():
    (registry,) = resources_of_type(module("registry"), "Microsoft.ContainerRegistry/registries").values()
    assert registry["config"]["properties"]["adminUserEnabled"] is False
    assert registry["config"]["properties"]["anonymousPullEnabled"] is False
    (ws,) = resources_of_type(module("workspace"), "Microsoft.MachineLearningServices/workspaces").values()
    assert ws["config"]["identity"]["type"] == "SystemAssigned"
    assert ws["config"]["properties"]["systemDatastoresAuthMode"] == "identity"
    for key in ("storageAccount", "keyVault", "applicationInsights", "containerRegistry"):
        assert key in ws["config"]["properties"]
    (appi,) = resources_of_type(module("monitoring"), "Microsoft.Insights/components").values()
    assert appi["config"]["properties"]["WorkspaceResourceId"]  # workspace-based, logs in Log Analytics


def test_endpoint_auth_identity_and_network_are_params():
    parsed = module("endpoint")
    (ep,) = resources_of_type(parsed, "Microsoft.MachineLearningServices/workspaces/onlineEndpoints").values()
    assert ep["config"]["kind"] == "Managed"
    assert ep["config"]["identity"]["type"] == "SystemAssigned"
    declared = parsed["parameters"]
    allowed = {d["type"]: d["argument"] for d in declared["authMode"]["decorators"]}["allowed"]
    assert {"aml_token", "key"} <= set(allowed)
    modes = parsed["variables"]["armAuthModes"]["value"]
    assert modes["aml_token"] == "AMLToken" and modes["key"] == "Key"
    network = parsed["variables"]["armNetworkAccess"]["value"]
    assert network == {"enabled": "Enabled", "disabled": "Disabled"}


def test_autoscale_targets_the_named_deployment_within_params_range(azure):
    parsed = module("endpoint")
    (auto,) = resources_of_type(parsed, "Microsoft.Insights/autoscalesettings").values()
    # deployed only once a deployment exists (the name is a param, empty before the first rollout)
    cond = auto["config"]["condition"]["operator"]
    assert cond["type"] == "not"
    assert cond["operands"]["bool_value"]["function"]["parameters"]["item_to_test"] == "autoscaleDeploymentName"
    target = parsed["variables"]["deploymentId"]["value"]["function"]
    assert target["type"] == "resource_id"
    assert "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments" in target["parameters"].values()
    assert "autoscaleDeploymentName" in target["parameters"].values()
    # one setting per colour: a setting's target never changes
    assert body(auto)["name"] == "autoscale-${endpointName}-${autoscaleDeploymentName}"
    props = body(auto)["properties"]
    assert props["targetResourceUri"] == "deploymentId"
    (profile,) = props["profiles"]
    cap = profile["capacity"]
    assert list(cap["minimum"]["function"]["parameters"].values()) == ["minInstances"]
    assert list(cap["maximum"]["function"]["parameters"].values()) == ["maxInstances"]
    directions = sorted(r["scaleAction"]["direction"] for r in profile["rules"])
    assert directions == ["Decrease", "Increase"]
    wired = parse(INFRA / "main.bicep")["modules"]["endpoint"]["config"]["params"]
    assert wired["minInstances"] == "endpointMinInstances" and wired["maxInstances"] == "endpointMaxInstances"
    assert wired["autoscaleDeploymentName"] == "autoscaleDeploymentName"


def _assignments() -> dict[str, tuple[str, str, str | None]]:
    """name -> (principal param, role key, scope symbol or None for the resource group)."""
    out = {}
    for name, res in resources_of_type(module("roles"), "Microsoft.Authorization/roleAssignments").items():
        cfg = body(res)
        props = cfg["properties"]
        ref = props["roleDefinitionId"]["function"]["parameters"]["resource_name_1"]
        role = ref if isinstance(ref, str) else ref["operator"]["operands"]["operand_2"]  # roles.X -> X
        out[name] = (props["principalId"], role, cfg.get("scope"))
    return out


def test_role_assignments_least_privilege():
    got = set(_assignments().values())
    assert ("clusterPrincipalId", "storageBlobDataContributor", "dvcContainer") in got
    assert ("ciPrincipalId", "storageBlobDataContributor", "dvcContainer") in got
    assert ("ciPrincipalId", "azureMLDataScientist", "workspace") in got
    assert ("clusterPrincipalId", "keyVaultSecretsUser", "keyVault") in got  # HF token, read only
    assert ("prPrincipalId", "storageBlobDataReader", "dvcContainer") in got
    assert ("prPrincipalId", "whatIfRoleName", None) in got
    # pull-request identity: read only, whatever the scope
    assert {r for p, r, _ in got if p == "prPrincipalId"} == {"storageBlobDataReader", "whatIfRoleName"}
    # role keys map to the real built-in role ids
    roles_var = module("roles")["variables"]["roles"]["value"]
    for key in {r for _, r, _ in got} - {"whatIfRoleName"}:
        assert roles_var[key] == ROLE_IDS[key], key


def test_what_if_role_reads_and_previews_but_cannot_write():
    parsed = module("roles")
    (role,) = resources_of_type(parsed, "Microsoft.Authorization/roleDefinitions").values()
    assert role["config"]["condition"] == "createWhatIfRole"  # needs Owner: first, manual deployment only
    props = body(role)["properties"]
    (perm,) = props["permissions"]
    assert sorted(perm["actions"]) == sorted(["*/read", "Microsoft.Resources/deployments/whatIf/action",
                                              "Microsoft.Resources/deployments/validate/action"])
    assert not any("write" in a.lower() or "delete" in a.lower() or a == "*" for a in perm["actions"])
    assert body(role)["name"] == "whatIfRoleName"
    assert parsed["parameters"]["createWhatIfRole"]["default"] is False
    for env, path in PARAM_FILES.items():  # off unless CREATE_WHATIF_ROLE=true is set by hand
        value = parse_bicepparam(path)[1]["createWhatIfRole"]["function"]
        assert value["type"] == "bool"
        assert value["parameters"]["arg_1"]["function"]["parameters"] == {"arg_1": "CREATE_WHATIF_ROLE", "arg_2": "false"}


def test_ci_infra_rights_are_opt_in_and_limited():
    assigned = resources_of_type(module("roles"), "Microsoft.Authorization/roleAssignments")
    for name in ("ciContributor", "ciRbacAdmin"):
        assert assigned[name]["config"]["condition"] == "ciCanDeployInfra", name
    props = body(assigned["ciRbacAdmin"])["properties"]
    assert props["conditionVersion"] == "2.0" and props["condition"] == "rbacCondition"
    condition = module("roles")["variables"]["rbacCondition"]["value"]
    assert "GuidEquals" in condition and "roleAssignments/write" in condition
    assert module("roles")["parameters"]["ciCanDeployInfra"]["default"] is False


def test_github_identity_uses_oidc_federation_without_secrets():
    parsed = module("github-identity")
    (fed,) = resources_of_type(
        parsed, "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials").values()
    assert {"type": "batchSize", "argument": 1} in fed["decorators"]  # serial writes
    assert fed["config"]["loop_type"]["detail"] == {"item_name": "subject", "array_name": "subjects"}
    props = body(fed)["properties"]
    assert props["issuer"] == "https://token.actions.githubusercontent.com"
    assert props["subject"] == "repo:${githubRepository}:${subject}"
    assert props["audiences"] == ["api://AzureADTokenExchange"]
    for path in BICEP_FILES + list(PARAM_FILES.values()):
        text = path.read_text().lower()
        for word in ("clientsecret", "client_secret", "password:", "listkeys("):
            assert word not in text, f"{path.name} contains {word}"


def test_ci_identity_per_environment_and_read_only_pull_request_identity():
    mods = parse(INFRA / "main.bicep")["modules"]
    ci = mods["githubIdentity"]["config"]["params"]["subjects"]
    assert ci["loop_type"]["detail"] == {"item_name": "env", "array_name": "githubEnvironments"}
    assert ci["config"] == "environment:${env}"
    assert mods["githubPullRequestIdentity"]["config"]["params"]["subjects"] == ["pull_request"]
    roles = mods["roles"]["config"]["params"]
    assert roles["prPrincipalId"]["operator"]["operands"]["operand_1"] == "githubPullRequestIdentity"
    assert roles["ciPrincipalId"]["operator"]["operands"]["operand_1"] == "githubIdentity"


def test_prod_reviewed_environment_is_federated():
    _, prod = parse_bicepparam(PARAM_FILES["prod"])
    assert set(prod["githubEnvironments"]) == {"train", "prod"}
    _, dev = parse_bicepparam(PARAM_FILES["dev"])
    assert dev["githubEnvironments"] == ["dev"]


def test_diagnostic_settings_send_everything_to_log_analytics():
    for name, rtype in (("storage", "Microsoft.Storage/storageAccounts"),
                        ("storage", "Microsoft.Storage/storageAccounts/blobServices"),
                        ("keyvault", "Microsoft.KeyVault/vaults"),
                        ("registry", "Microsoft.ContainerRegistry/registries"),
                        ("workspace", "Microsoft.MachineLearningServices/workspaces"),
                        ("endpoint", "Microsoft.MachineLearningServices/workspaces/onlineEndpoints")):
        parsed = module(name)
        targets = [k for k in resources_of_type(parsed, rtype)]
        diags = resources_of_type(parsed, "Microsoft.Insights/diagnosticSettings").values()
        scopes = {body(d)["scope"]: body(d)["properties"] for d in diags}
        for target in targets:
            assert target in scopes, f"{name}.bicep: no diagnostic setting for {rtype} {target}"
            assert scopes[target]["workspaceId"] == "logAnalyticsId"


def test_outputs_feed_workflows_and_dvc_config():
    outputs = parse(INFRA / "main.bicep")["outputs"]
    for key in ("workspaceName", "storageAccountName", "dvcContainerName", "dvcRemoteUrl",
                "ciIdentityClientId", "prIdentityClientId", "tenantId", "subscriptionId",
                "resourceGroupName", "clusterName", "endpointName"):
        assert key in outputs, key


def test_checkov_skips_are_in_the_bicep_with_reasons():
    skips = []
    for path in BICEP_FILES:
        for line in path.read_text().splitlines():
            m = re.search(r"checkov:skip=([A-Z0-9_]+)(:.*)?$", line)
            if m:
                skips.append(m.group(1))
                assert m.group(2) and len(m.group(2).strip(": ")) > 30, f"{path.name}: {m.group(1)} has no reason"
                assert line.strip().startswith("//"), f"{path.name}: skip must be a Bicep comment"
    assert len(skips) == len(set(skips)), "a check is skipped twice"
    script = (ROOT / ".ci" / "checkov.sh").read_text()
    assert re.search(r'CHECKOV_VERSION="\d+\.\d+\.\d+"', script)
    assert "--framework bicep -d infra" in script


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_every_params_yaml_annotation_in_the_param_files_is_true(env, azure):
    """Each `param x = v  // params.yaml azure.a.b [+ 'suffix']` line holds exactly that value."""
    params = {"azure": azure}
    _, values = parse_bicepparam(PARAM_FILES[env])
    annotated = 0
    for line in PARAM_FILES[env].read_text().splitlines():
        m = re.match(r"param (\w+) = .*//\s*params\.yaml ((?:azure)(?:\.\w+)+)(?: \+ '([\w-]*)')?", line)
        if not m:
            continue
        annotated += 1
        name, key, suffix = m.groups()
        want = _lookup(params, key)
        if suffix is not None:
            want = f"{want}{suffix}"
        assert values[name] == want, f"{env}.bicepparam: {name} = {values[name]!r} but params.yaml {key} = {want!r}"
    assert annotated >= 14


def test_a_changed_params_yaml_value_is_caught(azure):
    """The agreement check is not vacuous: a different VM size or idle time in params.yaml fails it."""
    _, values = parse_bicepparam(PARAM_FILES["prod"])
    changed = json.loads(json.dumps(azure))
    changed["compute"]["vm_size"] = "Standard_ND96isr_H100_v5"
    changed["compute"]["idle_seconds_before_scale_down"] = 600
    expected = _expected_from_params(changed)
    wrong = sorted(k for k, v in expected.items() if values.get(k) != v)
    assert wrong == ["clusterIdleSecondsBeforeScaleDown", "clusterVmSize"]
