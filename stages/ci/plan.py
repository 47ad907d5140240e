"""What the pull-request job can run, stage by stage, before it runs anything.

    python -m stages.ci.plan --remote true --json build/pr-comment/plan.json --github-output "$GITHUB_OUTPUT"

For params.yaml and `dvc status` (which stages changed against dvc.lock), every stage of dvc.yaml gets
one decision, with its reason:
- "cache": from the remote/run cache. Nothing it depends on changed, so `dvc repro --pull
  --allow-missing` takes its outputs from the DVC remote and never runs it.
- "runner": runs on the runner. base can when the model needs no download (embedded, packaged, a local
  folder) or is in this machine's Hugging Face cache at the pinned revision; a gated hub model's first
  fetch needs a token, which a pull-request runner never has, so a maintainer runs it once and pushes it
  (docs/azure.md, "The base model"); from then on it comes from the remote like any unchanged stage.
  preprocess always can when its tokenizer is here (the base folder's, or model.tokenizer's own). The model
  stages (train, evaluate_base, evaluate, package, deploy) can when the model's weights are here
  (embedded, a packaged model, a local folder or the Hugging Face cache: a pull-request runner has no
  token for gated weights) and the project's own CPU estimate (stages/core/estimate.py,
  estimate_cpu_training) trains it within the job's budget.
- "not_started": not started here, and why: a GPU-only setting (qlora, unsloth), weights that are not
  here, a CPU estimate over the budget (with the Azure estimate of the same run), or an upstream stage
  that is not started either.
The dry run and the cost estimate are checks, not stages: they always run on the runner (offline, no
training of a large model: the dry run builds a large one on the meta device).

The JSON holds the decisions, the reasons and `targets`: the stages to give `dvc repro` (every
"runner" stage; their upstream stages are "runner" or "cache"), and `proxy`: true when train or evaluate is
not started here, so the job runs the change through the CPU default instead (stages/ci/proxy.py). Nothing here downloads anything or
trains: a hub model's size comes from estimate.KNOWN_ARCHITECTURES, its tokens are counted with the
Llama 3.2 tokenizer that ships as a package (stages.core.estimate.counting_tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

# Decisions (keys) and how the comment words them.
CACHE, RUNNER, NOT_STARTED = "cache", "runner", "not_started"
DECISIONS = {CACHE: "from the remote/run cache", RUNNER: "runs on the runner", NOT_STARTED: "not started here"}
# Minutes of the pull-request job that training may take on the runner's CPU. The job
# (.github/workflows/ci.yml, pipeline) stops at 60 minutes; setup (about 2), evaluate_base, evaluate,
# package and deploy of the SmolLM2 default (about 2.5 together, README) and the comment need the rest,
# and a shared runner's CPU may be slower than the 2 cores the estimate is scaled from.
TRAIN_BUDGET_MINUTES = 30.0
# Stages that load the base model (weights, not only its tokenizer) and whose cost grows with it.
MODEL_STAGES = ("train", "evaluate_base", "evaluate", "package", "deploy")
# The stage that fetches or builds the base model (stages/base.py).
BASE_STAGE = "base"
CHECKS = ("dry run", "cost estimate")
# A change that one of these stages would show, when it is not started here, gets the proxy verdict.
PROXY_WHEN = ("train", "evaluate")


def dvc_status(cwd: str | Path = ".") -> dict:
    """`dvc status --json` (local: compares the workspace with dvc.lock; never contacts a remote)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc status failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def stage_outputs(dvc_yaml: dict) -> dict[str, list[str]]:
    outs = {}
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        paths = []
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key) or []:
                paths.append((next(iter(entry)) if isinstance(entry, dict) else entry).rstrip("/"))
        outs[name] = paths
    return outs


def _leaves(old, new, prefix: str) -> list[str]:
    """The keys that differ between two values of a params section, as "key old → new"."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [leaf for key in sorted(set(old) | set(new), key=str)
                for leaf in _leaves(old.get(key), new.get(key), f"{prefix}.{key}")]
    return [] if old == new else [f"{prefix} {old!r} → {new!r}"]


def changes(status: dict, dvc_yaml: dict, lock: dict | None = None, params_now: dict | None = None) -> dict[str, list[str]]:
    """Per stage, what changed against dvc.lock: its command, a param, a dependency that no stage produces,
    or a committed (git-tracked) output. Outputs or upstream outputs that are only missing here ("deleted",
    "not in cache": a fresh checkout) are not changes; the remote has them. With dvc.lock and the current
    params.yaml, a whole section that changed ("param train modified") is named by its keys
    ("param train.lora.r 16 → 32")."""
    produced = [p for paths in stage_outputs(dvc_yaml).values() for p in paths]

    def is_output(path: str) -> bool:
        return any(path == o or path.startswith(o + "/") or o.startswith(path.rstrip("/") + "/") for o in produced)

    found: dict[str, list[str]] = {}
    for stage, entries in (status or {}).items():
        if ":" in stage or stage not in (dvc_yaml.get("stages") or {}):
            continue  # .dvc files and foreign dvc.yaml files
        why = []
        for entry in entries or []:
            if isinstance(entry, str):  # "changed command", "always changed"
                why.append(entry)
                continue
            for kind, items in entry.items():
                for path, state in (items or {}).items():
                    if isinstance(state, dict):  # params: {"params.yaml": {"train.lora.r": "modified"}}
                        for key, value in sorted(state.items()):
                            old = ((((lock or {}).get("stages") or {}).get(stage) or {}).get("params") or {}) \
                                .get(path, {}).get(key) if lock else None
                            new = params_now
                            for part in key.split("."):
                                new = new.get(part) if isinstance(new, dict) else None
                            leaves = _leaves(old, new, key) if value == "modified" and old is not None \
                                and new is not None else []
                            why += [f"param {leaf}" for leaf in leaves] or [f"param {key} {value}"]
                    elif kind == "changed deps" and (state in ("modified", "new")
                                                     or (state == "deleted" and not is_output(path))):
                        why.append(f"{path} {state}")
                    elif kind == "changed outs" and state == "modified":
                        why.append(f"output {path} modified")
        if why:
            found[stage] = why
    return found


def _upstream(dvc_yaml: dict) -> dict[str, list[str]]:
    from stages.azure.launch import upstream_stages

    return {name: upstream_stages(dvc_yaml, name) for name in (dvc_yaml.get("stages") or {})}


def weights_here(name: str, filename: str = "config.json", revision: str = "") -> tuple[bool, str]:
    """Whether a model (or its tokenizer) loads on this machine without a download, and what it is."""
    from stages.core.modeling import EMBEDDED, PACKAGED
    from stages.core.params import ConfigError

    if name == EMBEDDED:
        return True, "built from params.yaml"
    if name in PACKAGED:
        try:
            PACKAGED[name].gguf_path()
            return True, f"ships in the {PACKAGED[name].package.replace('_', '-')} package"
        except ConfigError as exc:
            return False, str(exc)
    if Path(name).is_dir():
        return True, "a local folder"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, filename, revision=revision or None)  # the local cache only
    except Exception:  # noqa: BLE001 - an id the hub would reject is not here either
        cached = None
    if isinstance(cached, str):
        return True, "in this machine's Hugging Face cache"
    return False, ("a hub download (gated for Llama), not in this runner's Hugging Face cache, and a "
                   "pull-request runner has no Hugging Face token")


def _minutes(value: float) -> str:
    return f"{value:.1f} min" if value < 60 else f"{int(value // 60)} h {round(value % 60)} min"


def short_name(base: str) -> str:
    """Llama-3.2-1B for meta-llama/Llama-3.2-1B-Instruct, else the name as given."""
    from stages.core.estimate import architecture_key

    key = architecture_key(base)
    if not key:
        return base
    name = base.rstrip("/").split("/")[-1]
    return name[: len(key)] if name.lower().startswith(key) else name


def base_verdict(params) -> tuple[bool, str]:
    """Whether the base stage can run on this runner (fetch or build model.base), and why."""
    from stages.core.modeling import EMBEDDED, PACKAGED

    base, revision = params.model.base, params.model.revision
    if base == EMBEDDED:
        return True, "builds the seeded embedded model (seconds)"
    if base in PACKAGED:
        here, what = weights_here(base)
        return here, (f"converts the GGUF that {what.removeprefix('ships in ')} ships (once per machine)"
                      if here else what)
    if Path(base).is_dir():
        return True, "copies a local folder"
    if not revision:
        return False, "model.revision is empty: pin the hub commit to fetch (params.yaml, model.revision)"
    here, what = weights_here(base, revision=revision)
    if here:
        return True, f"{base} at {revision[:12]} is {what}"
    return False, (f"fetching {base} at {revision[:12]} is {what}: a maintainer runs `HF_TOKEN=... dvc repro base "
                   "&& dvc push base` once, and every run after that pulls it (docs/azure.md, \"The base model\")")


def model_verdict(params, budget_minutes: float) -> dict:
    """Whether this configuration's model trains (and so evaluates and packages) on the runner's CPU, by
    the project's own estimates; the reason either way. Never raises: an estimate that fails says so."""
    from stages.core.estimate import estimate_cpu_training, estimate_training, training_tokens
    from stages.core.training import check_method, package_available, select_backend
    from stages.core.params import ConfigError

    base, train = params.model.base, params.train
    verdict = {"model": base, "name": short_name(base), "method": train.method, "budget_minutes": budget_minutes}
    blockers = []
    try:
        check_method(train.method, False, package_available("bitsandbytes"))
    except ConfigError as exc:
        blockers.append(f"needs a GPU ({exc})")
    try:
        select_backend(train.backend, train.allow_backend_fallback, False, package_available("unsloth"))
    except ConfigError as exc:
        blockers.append(f"needs a GPU ({exc})")
    # The weights themselves are the base stage's output (models/base): its own decision says whether
    # they are here; a stage downstream of a base that is not started waits for it.
    verdict["weights"] = dict(zip(("here", "source"), base_verdict(params)))
    try:
        tokens, records = training_tokens(params)
        cpu = estimate_cpu_training(params, tokens_per_epoch=tokens, records_per_epoch=records)
        verdict["cpu"] = cpu
        if cpu["minutes"] > budget_minutes:
            blockers.insert(0, f"the CPU estimate is {_minutes(cpu['minutes'])} on this runner "
                               f"(budget {budget_minutes:g} min)")
        gpu = estimate_training(params)  # as the comment's estimate section computes it
        verdict["azure"] = {k: gpu[k] for k in ("vm_size", "gpu", "hours", "cost_usd", "expected_tokens_per_s")}
        verdict["azure"]["memory_gb"] = gpu["memory"]["total_gb"]
    except Exception as exc:  # noqa: BLE001 - the decision says the estimate failed instead of guessing
        blockers.append(f"no estimate ({type(exc).__name__}: {exc})")
    verdict["on_runner"] = not blockers
    verdict["blockers"] = blockers
    return verdict


def gpu_clause(verdict: dict) -> str:
    """"Llama-3.2-1B needs an H100 (Azure estimate 2.1 min, $0.21)"."""
    azure = verdict.get("azure")
    if not azure:
        return f"{verdict['name']} trains on Azure ML (train.yml)"
    gpu = azure["gpu"].split("-")[0]
    cost = "no price" if azure["cost_usd"] is None else f"${azure['cost_usd']:.2f}"
    return f"{verdict['name']} needs an {gpu} (Azure estimate {_minutes(azure['hours'] * 60)}, {cost})"


def make_plan(params_path: str | Path = "params.yaml", status: dict | None = None, dvc_yaml: dict | None = None,
              remote: bool = True, budget_minutes: float = TRAIN_BUDGET_MINUTES, cwd: str | Path = ".") -> dict:
    """The decisions for params_path and `status` (dvc status --json; read here when None)."""
    from stages.core.params import load_params

    cwd = Path(cwd)
    dvc_yaml = dvc_yaml if dvc_yaml is not None else yaml.safe_load((cwd / "dvc.yaml").read_text(encoding="utf-8"))
    status = status if status is not None else dvc_status(cwd)
    params = load_params(params_path)
    lock_path, params_file = cwd / "dvc.lock", cwd / "params.yaml"
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) if lock_path.is_file() else None
    params_now = yaml.safe_load(params_file.read_text(encoding="utf-8")) if params_file.is_file() else None
    changed = changes(status, dvc_yaml, lock, params_now)
    upstream = _upstream(dvc_yaml)
    names = list(dvc_yaml.get("stages") or {})
    model = None
    # The base model's own tokenizer comes from models/base (base is upstream of preprocess); another
    # tokenizer has to be on this machine.
    own_tokenizer = params.model.tokenizer == params.model.base
    tokenizer_here, tokenizer_what = (True, "") if own_tokenizer else \
        weights_here(params.model.tokenizer, "tokenizer_config.json")
    decisions: dict[str, dict] = {}
    for name in names:
        direct = changed.get(name, [])
        moved = [u for u in upstream[name] if decisions.get(u, {}).get("changed")]
        is_changed = bool(direct or moved)
        what = (f"{name} changed ({'; '.join(direct[:3])}{'; ...' if len(direct) > 3 else ''})" if direct
                else f"{name}'s inputs change ({', '.join(moved)} {'runs' if len(moved) == 1 else 'run'} first)"
                if moved else f"{name} unchanged")
        entry = {"stage": name, "changed": is_changed, "changes": direct, "upstream_changed": moved}
        if not is_changed and remote:
            entry.update(decision=CACHE, reason=f"{what}: its outputs come from the DVC remote")
        else:
            prefix = what if is_changed else f"{what}, but no DVC remote to pull it from"
            blocked = [u for u in upstream[name] if decisions.get(u, {}).get("decision") == NOT_STARTED]
            waits = (f"needs {', '.join(blocked)}, which {'is' if len(blocked) == 1 else 'are'} not started here"
                     if blocked else "")
            if name in MODEL_STAGES and not any(u in MODEL_STAGES for u in blocked):
                # the first stage of the model's own (train, evaluate_base): the model decides, and says why
                model = model or model_verdict(params, budget_minutes)
            if name in MODEL_STAGES and model and not model["on_runner"] \
                    and not any(u in MODEL_STAGES for u in blocked):
                entry.update(decision=NOT_STARTED, reason=f"{prefix}; {gpu_clause(model)}: "
                             + "; ".join(model["blockers"] + ([f"and it {waits}"] if waits else [])))
            elif blocked:
                entry.update(decision=NOT_STARTED, reason=f"{prefix}; {waits}")
            elif name == BASE_STAGE:
                here, why = base_verdict(params)
                entry.update(decision=RUNNER if here else NOT_STARTED, reason=f"{prefix}; {why}")
            elif name not in MODEL_STAGES:
                if tokenizer_here:
                    entry.update(decision=RUNNER, reason=f"{prefix}; cheap on a CPU")
                else:
                    entry.update(decision=NOT_STARTED, reason=f"{prefix}; model.tokenizer "
                                 f"'{params.model.tokenizer}' is {tokenizer_what}")
            else:
                model = model or model_verdict(params, budget_minutes)
                cpu = model["cpu"]
                entry.update(decision=RUNNER, reason=(
                    f"{prefix}; {model['name']} trains on this runner's CPU (estimate "
                    f"{_minutes(cpu['minutes'])}, budget {budget_minutes:g} min)" if name == "train"
                    else f"{prefix}; {model['name']} runs on this runner's CPU"))
        decisions[name] = entry
    checks = [{"check": "dry run", "decision": RUNNER,
               "reason": "python -m stages.dry_run: offline checks of params, data, tokenizer, model (a large one "
                         "on the meta device) and the estimates"},
              {"check": "cost estimate", "decision": RUNNER,
               "reason": "the Azure time and cost of the training a merge triggers (the estimate section)"}]
    return {"params": str(params_path), "model": params.model.base, "method": params.train.method,
            "remote": remote, "budget_minutes": budget_minutes,
            "stages": [decisions[n] for n in names], "checks": checks,
            "targets": [n for n in names if decisions[n]["decision"] == RUNNER],
            "not_started": [n for n in names if decisions[n]["decision"] == NOT_STARTED],
            # The proxy verdict (stages.ci.proxy): when this model's training or evaluation is not started
            # here, the same change runs through the CPU default on both revisions instead.
            "proxy": any(decisions[n]["decision"] == NOT_STARTED for n in PROXY_WHEN if n in decisions),
            **({"estimates": {k: model[k] for k in ("cpu", "azure", "weights") if k in model}} if model else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ci.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--remote", choices=("true", "false"), default="true",
                        help="whether unchanged stages can come from the DVC remote (false: a fork, or no remote)")
    parser.add_argument("--budget-minutes", type=float, default=TRAIN_BUDGET_MINUTES,
                        help="minutes training may take on this runner's CPU")
    parser.add_argument("--json", default=None, help="write the plan here")
    parser.add_argument("--md", default=None, help="write the comment's 'What CI ran' section here")
    parser.add_argument("--github-output", default=None,
                        help="append targets=<stages> (space-separated) to this file ($GITHUB_OUTPUT)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a plan never downloads
    plan = make_plan(args.params, remote=args.remote == "true", budget_minutes=args.budget_minutes)
    from stages.ci.pr_comment.plan import plan_section

    text = json.dumps(plan, indent=2, sort_keys=True) + "\n"
    for path, content in ((args.json, text), (args.md, plan_section(plan) + "\n")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content, encoding="utf-8")
    if args.github_output:
        with open(args.github_output, "a", encoding="utf-8") as handle:
            handle.write(f"targets={' '.join(plan['targets'])}\n")
            handle.write(f"proxy={'true' if plan['proxy'] else 'false'}\n")
    for entry in plan["stages"]:
        print(f"{entry['stage']}: {DECISIONS[entry['decision']]}: {entry['reason']}")
    print(f"dvc repro targets: {' '.join(plan['targets']) or '(none)'}")
    if plan["proxy"]:
        print("train or evaluate is not started here: the proxy verdict runs (python -m stages.ci.proxy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
