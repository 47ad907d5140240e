"""Named settings for a base model, applied to params.yaml in one step.

    python -m stages.preset list
    python -m stages.preset show smollm2-135m      # the equivalent `dvc exp run -S ...` line
    python -m stages.preset apply smollm2-135m     # writes the values into params.yaml (comments kept)

A preset (presets/NAME.yaml) is a flat mapping of dotted params.yaml keys to values: everything that
must change together when the base model changes (model, learning rate, trainable modules, gate
thresholds, package dtype, serving threads), with the reason for each value beside it. Applying one
validates the result with the same schema as every stage, so a preset cannot leave params.yaml broken.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml

from .core import cli
from .core.params import ConfigError, Params

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset '{name}' (available: {', '.join(available())})")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ConfigError(f"{path}: a preset is a mapping of dotted params.yaml keys to values")
    return values


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for i, key in enumerate(parents):
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"preset key '{dotted}': '{'.'.join(parents[:i + 1])}' is not a section of params.yaml")
        node = node[key]
    if leaf not in node:
        raise ConfigError(f"preset key '{dotted}' is not in params.yaml")
    node[leaf] = value


def applied(params_tree: dict, preset: dict) -> dict:
    """params.yaml's tree with the preset's values; validated by the params schema."""
    import copy

    tree = copy.deepcopy(params_tree)
    for key, value in preset.items():
        _set(tree, key, value)
    try:
        Params.model_validate(tree)
    except Exception as exc:  # pydantic's ValidationError, reworded by the params module elsewhere
        raise ConfigError(f"the preset leaves params.yaml invalid: {exc}") from None
    return tree


def exp_run_line(name: str) -> str:
    """The preset as one `dvc exp run` command (values as YAML flow, which -S parses)."""
    sets = " ".join(f"-S {shlex.quote(f'{k}={json.dumps(v)}' if not isinstance(v, str) else f'{k}={v}')}"
                    for k, v in load_preset(name).items())
    return f"dvc exp run {sets}"


def apply_to_file(name: str, params_path: str | Path) -> list[str]:
    """Write the preset into params.yaml in place, keeping its comments (ruamel, as DVC itself does)."""
    from ruamel.yaml import YAML

    path = Path(params_path)
    preset = load_preset(name)
    applied(yaml.safe_load(path.read_text(encoding="utf-8")), preset)  # validate before writing
    ry = YAML()
    ry.preserve_quotes = True
    ry.width = 4096
    doc = ry.load(path.read_text(encoding="utf-8"))
    changed = []
    for key, value in preset.items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node[part]
        if node[leaf] != value:
            changed.append(f"{key}: {node[leaf]!r} -> {value!r}")
            node[leaf] = value
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        ry.dump(doc, handle)
    tmp.replace(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.preset", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["list", "show", "apply"])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    def work():
        if args.action == "list":
            for name in available():
                first = (PRESETS / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
                print(f"{name:16s} {first}")
            return
        if not args.name:
            raise ConfigError(f"name a preset: {', '.join(available())}")
        if args.action == "show":
            print(exp_run_line(args.name))
            return
        changed = apply_to_file(args.name, args.params)
        print(f"[preset] {args.name}: " + ("; ".join(changed) if changed else "params.yaml already has these values"))

    return cli.run(work, "preset")


if __name__ == "__main__":
    sys.exit(main())
