"""Secrets inside Azure ML jobs: the Hugging Face token for the gated Llama weights is read from the
workspace's Key Vault with the job's managed identity and put into HF_TOKEN for the child
processes. It is never in git, never in the job spec, and never printed.

    python -m stages.azure.keyvault check    # says whether a token is needed and where it comes from
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from stages.core.params import ConfigError, Params

KEY_VAULT_URL_ENV = "AZURE_KEY_VAULT_URL"
SECRET_NAME_ENV = "HF_TOKEN_SECRET_NAME"
KEY_VAULT_SCOPE = "https://vault.azure.net/.default"
KEY_VAULT_API = "7.4"


def needs_hf_token(params: Params) -> bool:
    """A hub model id (org/name) needs the token; "embedded" and local folders do not."""
    for ref in (params.model.base, params.model.tokenizer):
        if ref != "embedded" and not Path(ref).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
            return True
    return False


def key_vault_url_from_id(resource_id: str) -> str:
    """ARM id .../providers/Microsoft.KeyVault/vaults/<name> -> https://<name>.vault.azure.net/"""
    match = re.search(r"/providers/Microsoft\.KeyVault/vaults/([A-Za-z0-9-]{3,24})$", resource_id or "", re.I)
    if not match:
        raise ConfigError(f"not a Key Vault resource id: {resource_id!r}")
    return f"https://{match.group(1)}.vault.azure.net/"


def fetch_secret(vault_url: str, name: str, credential=None, opener=urllib.request.urlopen) -> str:
    """The current value of one Key Vault secret (REST API, bearer token from `credential`)."""
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
    token = credential.get_token(KEY_VAULT_SCOPE).token
    url = f"{vault_url.rstrip('/')}/secrets/{urllib.parse.quote(name)}?api-version={KEY_VAULT_API}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with opener(request, timeout=30) as response:
            body = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"Key Vault secret {name!r} at {vault_url}: HTTP {exc.code} "
                          "(does the job's managed identity have 'Key Vault Secrets User'?)") from None
    value = body.get("value")
    if not value:
        raise ConfigError(f"Key Vault secret {name!r} at {vault_url} is empty")
    return value


def provide_hf_token(params: Params, env: dict | None = None, fetch=fetch_secret) -> str:
    """Put HF_TOKEN into `env` (os.environ by default) when the model needs it. Returns where the
    token came from ("not needed", "environment", "key vault"), never the token."""
    env = os.environ if env is None else env
    if not needs_hf_token(params):
        return "not needed"
    if env.get("HF_TOKEN"):
        return "environment"
    vault = env.get(KEY_VAULT_URL_ENV, "")
    name = env.get(SECRET_NAME_ENV) or params.azure.secrets.hf_token_secret_name
    if not vault:
        raise ConfigError(f"model {params.model.base!r} is gated and needs a Hugging Face token: set "
                          f"{KEY_VAULT_URL_ENV} (the workspace Key Vault, set by `stages.azure.jobs submit`) "
                          f"with secret {name!r}, or HF_TOKEN for a local run")
    env["HF_TOKEN"] = fetch(vault, name)
    return "key vault"


def main(argv: list[str] | None = None) -> int:
    from stages.core.params import load_params

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["check"]:
        print("usage: python -m stages.azure.keyvault check", file=sys.stderr)
        return 2
    params = load_params()
    env = dict(os.environ)
    source = provide_hf_token(params, env)
    print(f"HF token: {source}")
    return 0


if __name__ == "__main__":
    from stages.azure.config import run_cli

    sys.exit(run_cli(main, "azure.secrets"))
