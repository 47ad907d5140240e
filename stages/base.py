"""The base model as a pinned, hashed input of the graph: the `base` stage.

    python -m stages.base --output models/base

Writes model.base once as a plain model folder (config, weights, tokenizer) plus source.json, which says
what it is: the embedded model built from model.embedded, the SmolLM2 GGUF dequantised, a local folder
copied, or a hub model fetched at the commit model.revision pins (never a branch). dvc.lock records the
folder's content hash and `dvc push` puts it on the team's DVC remote, so from then on every machine
(Azure jobs, CI, laptops) gets the same bytes with `dvc pull base` and never downloads gated weights; a
hub update cannot change a rerun. The other stages read the folder (`--base-model models/base`).

Who fetches a gated hub model: whoever runs this stage first, once, with network access and HF_TOKEN
(docs/azure.md, "The base model").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core import cli
from .core.io import atomic_dir, write_json
from .core.modeling import SOURCE_FILE, model_source, source_record
from .core.params import load_params
from .core.progress import quiet_library_bars

STAGE = "base"


def build_base(model_params, output: str | Path) -> dict:
    """Materialise model.base into `output` (atomically: a failed fetch leaves the old folder). Returns
    the record written to source.json."""
    source = model_source(model_params.base, model_params.revision)
    record = {**source_record(model_params), **source.provenance()}
    with atomic_dir(output) as tmp:
        source.materialise(model_params, tmp)
        if not (tmp / "config.json").is_file():
            raise cli.ConfigError(f"model.base '{model_params.base}': no config.json among its files")
        record["files"] = sorted(f.name for f in tmp.iterdir())
        write_json(tmp / SOURCE_FILE, record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="models/base")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    def work() -> int:
        params = load_params(args.params)
        quiet_library_bars()
        record = build_base(params.model, args.output)
        size = sum(f.stat().st_size for f in Path(args.output).iterdir()) / 2**20
        pin = f" at {record['revision']}" if record.get("revision") else ""
        print(f"[{STAGE}] {params.model.base}{pin} -> {args.output} ({size:,.0f} MiB: {', '.join(record['files'])})")
        return 0

    return cli.run(work, STAGE)


if __name__ == "__main__":
    sys.exit(main())
