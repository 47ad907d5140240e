"""Run-to-run noise of training: the same data and params, several training seeds, the spread of the
tuned model's headline metrics. Not a DVC stage: it stays out of `dvc repro` and its time budget.

    python -m stages.evaluate noise --seeds 3            # seeds 1, 2, 3 (train.seed is replaced)
    python -m stages.evaluate noise --seeds 2 --set train.epochs=1 --out /tmp/noise.json

For each seed it writes a params file with `train.seed` set (and any --set overrides), runs the train
stage and then the evaluate stage as subprocesses into a temporary folder (never into models/ or
metrics/), and reads the tuned metrics. The base model's results (the evaluate_base stage) do not
depend on the seed: they are made once, into the same folder. It writes metrics/noise_floor.json (git-tracked):

    {"seeds": [1, 2, 3], "n_test": 63, "test_set_hash": "...", "overrides": {...},
     "seconds_per_seed": 212.4,
     "metrics": {"rouge_l": {"mean": ..., "sd": ..., "min": ..., "max": ..., "values": [...]}, ...}}

`sd` is the sample standard deviation over seeds (ddof=1): the PR comment prints it as "seed noise ±sd"
beside each delta. Three seeds give a rough figure; more seeds, a steadier one.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .core import io
from .core.params import ConfigError, load_params

NOISE_METRICS = ("rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "exact_match", "fact_recall",
                 "no_end_token_rate", "degenerate_rate", "val_loss")


def parse_override(text: str) -> tuple[list[str], object]:
    """"train.epochs=1" -> (["train", "epochs"], 1); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=1")
    return key.strip().split("."), yaml.safe_load(value)


def params_for_seed(raw: dict, seed: int, overrides: list[tuple[list[str], object]]) -> dict:
    out = json.loads(json.dumps(raw))
    for path, value in overrides + [(["train", "seed"], seed)]:
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not a section of params.yaml")
            node = node[part]
        node[path[-1]] = value
    return out


def spread(values: list[float | None]) -> dict | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v)]
    if not numbers:
        return None
    return {"mean": round(statistics.fmean(numbers), 6),
            "sd": round(statistics.stdev(numbers), 6) if len(numbers) > 1 else None,
            "min": round(min(numbers), 6), "max": round(max(numbers), 6),
            "values": [round(v, 6) for v in numbers]}


def summarise(runs: list[dict], seeds: list[int], overrides: dict, seconds: float, model: str | None = None) -> dict:
    """The noise-floor file from the evaluate stage's metrics of each seed's run."""
    hashes = {(r.get("test_set") or {}).get("hash") for r in runs}
    if len(hashes) > 1:
        raise ConfigError("the seeds' runs evaluated different test sets: the noise floor would mix them")
    metrics = {}
    for name in NOISE_METRICS:
        entry = spread([(r.get("tuned") or {}).get(name) for r in runs])
        if entry is not None:
            metrics[name] = entry
    # model: the base model it was measured for (model.base); another model's seed noise does not apply.
    return {"model": model, "seeds": seeds, "n_test": runs[0].get("n_test") if runs else None,
            "test_set_hash": next(iter(hashes)) if hashes else None, "overrides": overrides,
            "seconds_per_seed": round(seconds / max(1, len(seeds)), 1), "metrics": metrics}


def _stage(args: list[str], log) -> None:
    log("[noise] python -m " + " ".join(args))
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ConfigError(f"{args[0]} failed (exit {done.returncode}):\n{tail}")


def run_seeds(params_path: Path, data: Path, seeds: list[int], overrides: list[tuple[list[str], object]],
              work: Path, log=print) -> list[dict]:
    raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    runs = []
    base = work / "eval_base"  # the base model's results do not depend on the training seed: made once
    for seed in seeds:
        folder = work / f"seed_{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        seed_params = folder / "params.yaml"
        seed_params.write_text(yaml.safe_dump(params_for_seed(raw, seed, overrides), sort_keys=False),
                               encoding="utf-8")
        load_params(seed_params)  # a bad --set fails here, with the key, before any training
        _stage(["stages.train", "--params", str(seed_params), "--data", str(data), "--output", str(folder / "adapter"),
                "--checkpoints", "", "--metrics", str(folder / "train.json"), "--live", ""], log)
        if not base.exists():
            _stage(["stages.evaluate_base", "--params", str(seed_params), "--data", str(data), "--output", str(base)], log)
        _stage(["stages.evaluate", "--params", str(seed_params), "--data", str(data), "--adapter",
                str(folder / "adapter"), "--base", str(base), "--metrics", str(folder / "eval.json"), "--summary", "",
                "--report", str(folder / "report")], log)
        runs.append(json.loads((folder / "eval.json").read_text(encoding="utf-8")))
        log(f"[noise] seed {seed}: tuned rouge_l {runs[-1]['tuned'].get('rouge_l')}")
    return runs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate noise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="how many training seeds (at least 2)")
    parser.add_argument("--first-seed", type=int, default=1, help="seeds are first-seed, first-seed+1, ...")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/processed", help="processed splits (run dvc repro preprocess first)")
    parser.add_argument("--out", default="metrics/noise_floor.json")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one, removed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params override for every seed, e.g. --set train.epochs=1 (repeatable)")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        raise ConfigError("--seeds must be at least 2: one seed has no spread")
    data = Path(args.data)
    if not (data / "train.jsonl").is_file() or not (data / "test.jsonl").is_file():
        raise ConfigError(f"{data} has no train.jsonl/test.jsonl (run the preprocess stage first: dvc repro preprocess)")
    overrides = [parse_override(text) for text in args.set]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    started = time.perf_counter()
    if args.work:
        runs = run_seeds(Path(args.params), data, seeds, overrides, Path(args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="noise-") as tmp:
            runs = run_seeds(Path(args.params), data, seeds, overrides, Path(tmp))
    model = dict(((".".join(k), v) for k, v in overrides)).get("model.base") or \
        (yaml.safe_load(Path(args.params).read_text(encoding="utf-8")) or {}).get("model", {}).get("base")
    result = summarise(runs, seeds, {".".join(k): v for k, v in overrides}, time.perf_counter() - started, model)
    io.write_json(args.out, result)
    shown = ", ".join(f"{k} ±{v['sd']:.4f}" for k, v in result["metrics"].items() if v.get("sd") is not None)
    print(f"[noise] {len(seeds)} seeds, {result['seconds_per_seed']:.0f} s per seed; seed noise (sd): {shown}")
    print(f"[noise] wrote {args.out}")
    return 0
