"""The proxy verdict: a pull request's change, run through the CPU default on both revisions.

    python -m stages.ci.proxy plan --base-params BASE.yaml --head-params HEAD.yaml --json build/proxy/proxy.json
    python -m stages.ci.proxy prepare --base-rev origin/main --head-rev HEAD --build build/proxy
    python -m stages.ci.proxy run --build build/proxy [--pull]
    python -m stages.ci.proxy verdict --base-rev origin/main [--pull]   # prepare, then run (what ci.yml calls)
    python -m stages.ci.proxy warm --rev HEAD   # the base side alone, on a push to main (proxy-cache.yml)

When stages.ci.plan does not start the production model's train stage on the runner (a hub Llama, a
GPU-only setting, a CPU estimate over the budget), the pull-request job still shows what the change
does: the base branch and the PR head are both run with the CPU default (presets/smollm2-135m.yaml, a
small pretrained Llama-architecture model) on the same data, on the same runner, in the same job, and
the comment compares the two evaluations paired over the test records (stages/ci/pr_comment/proxy.py).

Which params each side gets (`proxy_params`):
- the side's own params.yaml with the proxy preset applied (its model, and the settings that go with it);
- then the PR's changed keys (the leaves that differ between the two params.yaml files), on the head side:
  - `model.*` never applies: the proxy's model is the point of the proxy;
  - a key the preset sets (train.lora.r, train.learning_rate, train.epochs, ...) keeps the preset's value
    on the base side and moves on the head side by the PR's own factor: train.lora.r 32 -> 8 on the
    production model is 16 -> 4 on the proxy, train.learning_rate x2 is x2. A change a factor cannot
    carry (a text, a switch, a list, from or to zero, an integer that rounds back to the same value)
    does not apply, and says why;
  - any other key keeps the head's value (the preset does not touch it).
Every key that did not apply is listed with its reason, and the comment shows that list.

`prepare` checks out both revisions as git worktrees under the build folder and writes each one's proxy
params.yaml; `run` reproduces the evaluation in each, base first (`dvc repro --pull --allow-missing
publish_eval` with the DVC remote, which also pulls the remote's run cache; plain `dvc repro publish_eval`
without one), both sharing this checkout's DVC cache. A stage whose inputs either side has already run
(this job's other side, an earlier job whose DVC cache ci.yml restored, the remote's run cache) is
restored from DVC's run cache instead of run: base, train, evaluate_base and evaluate keep one (their
outputs are all cached; dvc.yaml says why preprocess, package and deploy do not), so the base side of a
second pull request against the same base commit trains nothing, and a head side that changes only
evaluation settings does not train either. proxy.json lists, per side, the stages that ran and the
stages restored. Nothing here downloads a model: the proxy's weights ship in a package. Nothing trains
in the plan or prepare steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

PROXY_PRESET = "smollm2-135m"
# The keys of params.yaml that belong to the model itself: never carried over from the PR.
MODEL_PREFIX = "model."
BUILD = Path("build/proxy")
SIDES = ("base", "head")
TARGET = "publish_eval"  # evaluate, then its metrics/eval.json and eval_records.json in git's place


# ---------------------------------------------------------------------------------------------
# plan: which params each side runs with


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """{"train.lora.r": 16, ...}: the leaves of a params tree (a dict value that is empty is a leaf)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, object] = {}
        for key in tree:
            out.update(flatten(tree[key], f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree} if prefix else {}


_MISSING = object()


def changed_keys(base_tree: dict, head_tree: dict) -> list[str]:
    """The dotted leaves whose values differ between the base's and the head's params.yaml (added,
    removed or modified), sorted: what `dvc params diff` lists."""
    old, new = flatten(base_tree), flatten(head_tree)
    return sorted(k for k in set(old) | set(new) if old.get(k, _MISSING) != new.get(k, _MISSING))


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _put(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _owner(key: str, preset: dict) -> str | None:
    """The preset key that sets `key` (itself, or a section above it), if any."""
    for name in preset:
        if key == name or key.startswith(name + "."):
            return name
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scaled(proxy_value, old, new):
    """The proxy's value moved by the PR's factor new/old, or None when a factor cannot carry the change."""
    if not (_number(proxy_value) and _number(old) and _number(new)) or old <= 0 or new <= 0 or proxy_value <= 0:
        return None
    value = proxy_value * (new / old)
    if isinstance(proxy_value, int) and isinstance(old, int) and isinstance(new, int):
        value = max(1, round(value))
    else:
        value = float(f"{value:.6g}")
    return None if value == proxy_value else value


def _show(value) -> str:
    return "(absent)" if value is _MISSING else json.dumps(value) if not isinstance(value, str) else repr(value)


def proxy_params(base_tree: dict, head_tree: dict, preset: dict | None = None,
                 preset_name: str = PROXY_PRESET) -> dict:
    """The proxy params of both sides and what happened to each changed key.

    Returns {"preset", "model", "changed", "applied": [{key, production, proxy}], "not_applied": [{key,
    production, reason}], "base": tree, "head": tree}; both trees validate against the params schema."""
    from stages.core.params import ConfigError, Params
    from stages.preset import applied, load_preset

    preset = preset if preset is not None else load_preset(preset_name)
    base_proxy = applied(base_tree, preset)
    head_proxy = applied(head_tree, preset)
    result_applied, not_applied = [], []
    for key in changed_keys(base_tree, head_tree):
        old, new = _get(base_tree, key), _get(head_tree, key)
        production = f"{_show(old)} → {_show(new)}"
        owner = _owner(key, preset)
        if key.startswith(MODEL_PREFIX):
            reason = f"a setting of the production model; the proxy runs {preset.get('model.base', preset_name)}"
            not_applied.append({"key": key, "production": production, "reason": reason})
            _restore(head_proxy, base_proxy, key)
            continue
        if owner is None:
            result_applied.append({"key": key, "production": production,
                                   "proxy": f"{_show(_get(base_proxy, key))} → {_show(_get(head_proxy, key))}"})
            continue
        start = _get(base_proxy, key)
        value = _scaled(start, old, new)
        if value is None:
            reason = (f"presets/{preset_name}.yaml sets it for the proxy ({_show(start)}), and the change has no "
                      "proportional equivalent there")
            if _number(start) and _number(old) and _number(new) and old > 0 and new > 0:
                reason = (f"presets/{preset_name}.yaml sets it for the proxy ({_show(start)}); the PR's factor "
                          f"×{new / old:.3g} rounds back to {_show(start)}")
            not_applied.append({"key": key, "production": production, "reason": reason})
            _restore(head_proxy, base_proxy, key)
            continue
        _put(head_proxy, key, value)
        result_applied.append({"key": key, "production": production,
                               "proxy": f"{_show(start)} → {_show(value)} (the PR's factor ×{new / old:.3g})"})
    for side, tree in (("base", base_proxy), ("head", head_proxy)):
        try:
            Params.model_validate(tree)
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError, reworded
            raise ConfigError(f"the {side} side's proxy params are invalid: {exc}") from None
    production = ((head_tree.get("model") or {}).get("base") if isinstance(head_tree.get("model"), dict) else None)
    return {"preset": preset_name, "model": preset.get("model.base", preset_name), "production_model": production,
            "changed": changed_keys(base_tree, head_tree), "applied": result_applied, "not_applied": not_applied,
            "base": base_proxy, "head": head_proxy}


def _restore(head_proxy: dict, base_proxy: dict, key: str) -> None:
    """A key that does not apply takes the base side's proxy value (or disappears with it)."""
    value = _get(base_proxy, key)
    if value is not _MISSING:
        _put(head_proxy, key, copy.deepcopy(value))
        return
    *parents, leaf = key.split(".")
    node = _get(head_proxy, ".".join(parents)) if parents else head_proxy
    if isinstance(node, dict):
        node.pop(leaf, None)


# ---------------------------------------------------------------------------------------------
# prepare and run: two worktrees, one dvc repro each


def _git(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc.stdout.strip()


def _dump(tree: dict) -> str:
    return ("# Written by python -m stages.ci.proxy: this revision's params.yaml with the proxy preset applied\n"
            "# and the pull request's changes carried over where they apply (build/proxy/proxy.json says which).\n"
            + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))


def prepare(base_rev: str, head_rev: str, build: Path = BUILD, repo: Path = Path("."),
            preset_name: str = PROXY_PRESET) -> dict:
    """Worktrees of both revisions under `build`, each with its proxy params.yaml; proxy.json beside them."""
    repo, build = Path(repo).resolve(), Path(build)
    build = build if build.is_absolute() else repo / build
    shas = {side: _git(["rev-parse", "--verify", f"{rev}^{{commit}}"], repo)
            for side, rev in (("base", base_rev), ("head", head_rev))}
    trees = {side: yaml.safe_load(_git(["show", f"{shas[side]}:params.yaml"], repo)) or {} for side in SIDES}
    result = proxy_params(trees["base"], trees["head"], preset_name=preset_name)
    build.mkdir(parents=True, exist_ok=True)
    cache = _dvc_cache_dir(repo)
    for side in SIDES:
        where = build / side
        if where.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=repo, capture_output=True)
        _git(["worktree", "add", "--detach", str(where), shas[side]], repo)
        (where / "params.yaml").write_text(_dump(result[side]), encoding="utf-8")
        if cache:  # one cache for both sides and this checkout: outputs computed once are reused
            subprocess.run([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(cache)], cwd=where,
                           capture_output=True, text=True, timeout=120)
    info = {k: v for k, v in result.items() if k not in SIDES}
    info.update(revisions={side: {"rev": rev, "sha": shas[side]} for side, rev in
                           (("base", base_rev), ("head", head_rev))},
                params={side: flatten(result[side]) for side in SIDES})
    write_json(build / "proxy.json", info)
    return info


def _dvc_cache_dir(repo: Path) -> Path | None:
    proc = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], cwd=repo, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    path = Path(proc.stdout.strip().splitlines()[-1])
    return path if path.is_absolute() else repo / path


def repro_command(pull: bool, target: str = TARGET) -> list[str]:
    """What each side runs: with the DVC remote, --pull also fetches its run cache."""
    return [sys.executable, "-m", "dvc", "repro", *(["--pull", "--allow-missing"] if pull else []), target]


def run(build: Path = BUILD, pull: bool = False, timeout_minutes: float = 25.0,
        sides: tuple[str, ...] = SIDES) -> dict:
    """`dvc repro publish_eval` in each worktree, base first; outcome, wall time, the stages run and the
    stages restored from the run cache per side, into proxy.json."""
    build = Path(build)
    info = json.loads((build / "proxy.json").read_text(encoding="utf-8"))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # the stage commands call `python`: this environment's, for both sides
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)  # each side imports its own revision's code (cwd)
    # one converted copy of the proxy's packaged weights for both sides (this checkout's, not one per worktree)
    from stages.core.modeling import cache_dir

    env.setdefault("LLAMA_FT_MODEL_CACHE", str(cache_dir().resolve()))
    runs = {}
    for side in sides:
        cmd = repro_command(pull)
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=build / side, env=env, capture_output=True, text=True,
                                  timeout=timeout_minutes * 60)
            ok, log = proc.returncode == 0, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            ok, log = False, f"timed out after {timeout_minutes:g} min: {exc}"
        seconds = round(time.monotonic() - start, 1)
        (build / f"{side}.log").write_text(log, encoding="utf-8")
        print(f"[proxy] {side}: {'ok' if ok else 'FAILED'} in {seconds:g} s ({' '.join(cmd[2:])})", flush=True)
        if not ok:
            print(log[-3000:], file=sys.stderr)
        runs[side] = {"ok": ok, "seconds": seconds, "command": " ".join(["dvc", *cmd[3:]]),
                      "ran": ran_stages(log), "restored": restored_stages(log)}
    info["runs"] = runs
    write_json(build / "proxy.json", info)
    return info


def ran_stages(log: str) -> list[str]:
    """The stages dvc repro actually ran (not the ones it skipped or restored from the run cache)."""
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")]


def restored_stages(log: str) -> list[str]:
    """The stages dvc repro restored from the run cache instead of running them."""
    return [line.split("'")[1] for line in log.splitlines()
            if line.startswith("Stage '") and "is cached - skipping run" in line]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ci.proxy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p_plan = sub.add_parser("plan", help="the proxy params of both sides, from two params.yaml files")
    p_plan.add_argument("--base-params", required=True)
    p_plan.add_argument("--head-params", required=True)
    p_plan.add_argument("--json", default=None, help="write the result here (default: stdout)")
    p_prep = sub.add_parser("prepare", help="worktrees of both revisions with their proxy params.yaml")
    p_prep.add_argument("--base-rev", required=True)
    p_prep.add_argument("--head-rev", default="HEAD")
    p_prep.add_argument("--build", default=str(BUILD))
    p_run = sub.add_parser("run", help="dvc repro publish_eval in both worktrees")
    p_run.add_argument("--build", default=str(BUILD))
    p_run.add_argument("--pull", action="store_true", help="dvc repro --pull --allow-missing (the DVC remote)")
    p_run.add_argument("--timeout-minutes", type=float, default=25.0, help="per side")
    p_all = sub.add_parser("verdict", help="prepare, then run: the whole proxy step of the pull-request job")
    p_all.add_argument("--base-rev", required=True)
    p_all.add_argument("--head-rev", default="HEAD")
    p_all.add_argument("--build", default=str(BUILD))
    p_all.add_argument("--pull", action="store_true", help="dvc repro --pull --allow-missing (the DVC remote)")
    p_all.add_argument("--timeout-minutes", type=float, default=25.0, help="per side")
    p_warm = sub.add_parser("warm", help="the base side alone, for a commit of the base branch: fills the DVC "
                                         "cache (run cache included) that pull requests against it restore")
    p_warm.add_argument("--rev", default="HEAD")
    p_warm.add_argument("--build", default=str(BUILD))
    p_warm.add_argument("--timeout-minutes", type=float, default=25.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stages.core.params import ConfigError

    try:
        if args.action == "plan":
            trees = [yaml.safe_load(Path(p).read_text(encoding="utf-8")) or {} for p in
                     (args.base_params, args.head_params)]
            result = proxy_params(*trees)
            text = json.dumps(result, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            Path(args.json).write_text(text, encoding="utf-8") if args.json else sys.stdout.write(text)
            for entry in result["not_applied"]:
                print(f"not applied: {entry['key']} ({entry['production']}): {entry['reason']}", file=sys.stderr)
            return 0
        if args.action == "warm":
            prepare(args.rev, args.rev, Path(args.build))
            info = run(Path(args.build), False, args.timeout_minutes, sides=("base",))
            return 0 if info["runs"]["base"]["ok"] else 1
        if args.action in ("prepare", "verdict"):
            info = prepare(args.base_rev, args.head_rev, Path(args.build))
            print(f"[proxy] {len(info['applied'])} changed key(s) applied, {len(info['not_applied'])} not; "
                  f"worktrees in {args.build}/base and {args.build}/head", flush=True)
            for entry in info["not_applied"]:
                print(f"[proxy] not applied: {entry['key']} ({entry['production']}): {entry['reason']}", flush=True)
            if args.action == "prepare":
                return 0
        info = run(Path(args.build), args.pull, args.timeout_minutes)
        return 0 if all(r["ok"] for r in info["runs"].values()) else 1
    except (ConfigError, RuntimeError, OSError, yaml.YAMLError) as exc:
        print(f"[proxy] {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
