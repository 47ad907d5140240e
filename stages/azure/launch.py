"""What every process of the Azure ML training job runs (`distribution: pytorch` starts one per
GPU on every node, with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT set).

Rank 0 drives DVC: `dvc pull -r R`, `dvc repro <target>`, `dvc push -r R`, then copies dvc.lock and the
git-tracked metrics/plots into the job's `results` output. The distributed stage (train) must see
every rank, so the other ranks prepare the same inputs (pull + the upstream stages, which are
deterministic), decide from `dvc status` whether that stage will run at all, and if so run its
`cmd` as workers (they join rank 0's process group; only rank 0 writes outputs). Local ranks > 0
wait for their node's first process to prepare the shared working folder.

R is params.yaml's azure.storage.dvc_remote_name, always named: a clone whose .dvc/config has another
default remote (or none) still pulls from and pushes to the team's remote, never elsewhere.

The plan is computed by `plan_for_rank` (a plain function, tested); `main` executes it.

    python -m stages.azure.launch --target package --results <folder>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stages.core.params import ConfigError



def ready_file(env=None) -> Path:
    """The marker a node's first process writes once the inputs are ready; named per job run so a
    stale marker from an earlier run can never release the other processes early."""
    env = os.environ if env is None else env
    run = env.get("AZUREML_RUN_ID") or f"{env.get('MASTER_ADDR', 'local')}-{env.get('MASTER_PORT', '0')}"
    return Path(f".azureml-node-ready-{''.join(c if c.isalnum() or c in '-_.' else '_' for c in run)}.json")


@dataclass(frozen=True)
class Step:
    kind: str          # run | signal_ready | wait_ready | decide | worker_stage | collect | secrets
    args: tuple = field(default_factory=tuple)

    def describe(self) -> str:
        return " ".join((self.kind, *map(str, self.args)))


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls, env=None) -> "RankInfo":
        env = os.environ if env is None else env
        try:
            return cls(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")))
        except ValueError as exc:
            raise ConfigError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers: {exc}") from None


def upstream_stages(dvc_yaml: dict, stage: str) -> list[str]:
    """Stages whose outs feed `stage` (directly or not), in dvc.yaml order."""
    stages = dvc_yaml.get("stages", {})
    if stage not in stages:
        raise ConfigError(f"dvc.yaml has no stage {stage!r} (stages: {', '.join(stages)})")

    def outs(name):
        paths = []
        for key in ("outs", "metrics", "plots"):
            for entry in stages[name].get(key, []) or []:
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
        return [p.rstrip("/") for p in paths]

    def deps(name):
        return [d.rstrip("/") for d in stages[name].get("deps", []) or []]

    def feeds(producer, consumer):
        return any(d == o or d.startswith(o + "/") or o.startswith(d + "/")
                   for d in deps(consumer) for o in outs(producer))

    needed, frontier = set(), [stage]
    while frontier:
        current = frontier.pop()
        for name in stages:
            if name not in needed and name != stage and feeds(name, current):
                needed.add(name)
                frontier.append(name)
    return [name for name in stages if name in needed]


def plan_for_rank(info: RankInfo, target: str, distributed_stage: str, upstream: list[str],
                  results: str, *, remote: str) -> list[Step]:
    """The steps one process runs. world_size 1: pull, repro, push, collect. `remote` is the DVC remote
    every pull and push names (azure.storage.dvc_remote_name), whatever .dvc/config's default is."""
    pull = Step("run", ("dvc", "pull", "-r", remote, "--allow-missing"))
    push = Step("run", ("dvc", "push", "-r", remote))
    if info.world_size <= 1:
        return [Step("secrets"), pull, Step("run", ("dvc", "repro", target)), push, Step("collect", (results,))]
    prepare = [Step("secrets")]
    if info.local_rank == 0:
        prepare += [pull] + [Step("run", ("dvc", "repro", name)) for name in upstream]
        prepare += [Step("decide", (distributed_stage,)), Step("signal_ready")]
    else:
        prepare += [Step("wait_ready")]
    if info.rank == 0:
        # --no-run-cache: the workers were told the distributed stage runs, so it must really run
        return prepare + [Step("run", ("dvc", "repro", "--no-run-cache", target)), push, Step("collect", (results,))]
    return prepare + [Step("worker_stage", (distributed_stage,))]


def tracked_results(dvc_yaml: dict) -> list[str]:
    """dvc.lock plus every outs/metrics/plots path with cache: false (git-tracked, so it must come back),
    except persistent outs (checkpoints)."""
    paths = ["dvc.lock"]
    for stage in dvc_yaml.get("stages", {}).values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []) or []:
                if isinstance(entry, dict):
                    path, options = next(iter(entry.items()))
                    # persist: true outs (resumable checkpoints) stay on the job's side
                    if isinstance(options, dict) and options.get("cache") is False and not options.get("persist"):
                        paths.append(path)
    return list(dict.fromkeys(paths))


def copy_tracked_results(dvc_yaml: dict, source_root: Path, target_root: Path) -> list[str]:
    """Copy each of tracked_results(dvc_yaml) that exists under source_root to the same relative
    path under target_root; the paths copied."""
    copied = []
    for relative in tracked_results(dvc_yaml):
        source = source_root / relative
        target = target_root / relative
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        else:
            continue
        copied.append(relative)
    return copied


def collect(results: str | Path, dvc_yaml: dict, root: Path = Path(".")) -> list[str]:
    """Copy dvc.lock and the git-tracked metrics/plots into the `results` output folder."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    copied = copy_tracked_results(dvc_yaml, root, results)
    (results / "results.json").write_text(json.dumps({"files": copied}, indent=2) + "\n", encoding="utf-8")
    return copied


def stage_commands(stage: str) -> list[str]:
    """The stage's command(s) as DVC resolves them (params templating such as ${train.x} applied)."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        cmd = repo.stage.collect(stage)[0].cmd
    return list(cmd) if isinstance(cmd, (list, tuple)) else [cmd]


def stage_is_stale(stage: str) -> bool:
    out = subprocess.run(["dvc", "status", stage, "--json"], capture_output=True, text=True, check=True)
    return bool(json.loads(out.stdout or "{}"))


def ensure_git_repo(root: Path = Path(".")) -> bool:
    """DVC needs a git repository; the job's code snapshot leaves .git out (.amlignore), so start an
    empty one (the commit the job was built from is in the job's tags and GIT_COMMIT)."""
    if (root / ".git").exists():
        return False
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return True


def execute(steps: list[Step], dvc_yaml: dict, info: RankInfo, wait_s: float = 7200) -> int:
    run_stage = True
    if info.local_rank == 0:
        ensure_git_repo()
    for step in steps:
        print(f"[rank {info.rank}] {step.describe()}", flush=True)
        if step.kind == "secrets":
            from stages.azure.keyvault import provide_hf_token
            from stages.core.params import load_params

            print(f"[rank {info.rank}] HF token: {provide_hf_token(load_params())}", flush=True)
        elif step.kind == "run":
            subprocess.run(list(step.args), check=True)
        elif step.kind == "decide":
            run_stage = stage_is_stale(step.args[0])
        elif step.kind == "signal_ready":
            tmp = ready_file().with_suffix(".tmp")
            tmp.write_text(json.dumps({"run_stage": run_stage}), encoding="utf-8")
            os.replace(tmp, ready_file())
        elif step.kind == "wait_ready":
            deadline = time.monotonic() + wait_s
            while not ready_file().exists():
                if time.monotonic() > deadline:
                    raise ConfigError(f"node leader did not prepare the inputs within {wait_s:.0f} s")
                time.sleep(2)
            run_stage = json.loads(ready_file().read_text(encoding="utf-8"))["run_stage"]
        elif step.kind == "worker_stage":
            if not run_stage:
                print(f"[rank {info.rank}] {step.args[0]} is up to date: nothing to do", flush=True)
                continue
            for cmd in stage_commands(step.args[0]):
                subprocess.run(cmd, shell=True, check=True)
        elif step.kind == "collect":
            copied = collect(step.args[0], dvc_yaml)
            print(f"[rank {info.rank}] results: {', '.join(copied)}", flush=True)
        else:
            raise ValueError(f"unknown step {step.kind}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.azure.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="last dvc.yaml stage to reproduce")
    parser.add_argument("--distributed-stage", default="train", help="the stage every rank joins")
    parser.add_argument("--results", required=True, help="the job's results output folder")
    parser.add_argument("--dry-run", action="store_true", help="print this rank's plan and stop")
    parser.add_argument("--params", default="params.yaml", help="names the DVC remote (azure.storage.dvc_remote_name)")
    args = parser.parse_args(argv)
    dvc_yaml = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8"))
    info = RankInfo.from_env()
    upstream = upstream_stages(dvc_yaml, args.distributed_stage) if info.world_size > 1 else []
    from stages.core.params import load_params

    remote = load_params(args.params).azure.storage.dvc_remote_name
    steps = plan_for_rank(info, args.target, args.distributed_stage, upstream, args.results, remote=remote)
    if args.dry_run:
        for step in steps:
            print(step.describe())
        return 0
    try:
        return execute(steps, dvc_yaml, info)
    except subprocess.CalledProcessError as exc:
        print(f"[rank {info.rank}] step failed (exit {exc.returncode}): {' '.join(map(str, exc.cmd)) if isinstance(exc.cmd, list) else exc.cmd}",
              file=sys.stderr)
        return exc.returncode or 1


if __name__ == "__main__":
    from stages.azure.config import run_cli

    sys.exit(run_cli(main, "azure.launch"))
