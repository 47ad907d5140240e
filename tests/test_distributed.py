"""Data parallelism: two processes (gloo, CPU) give the same losses as one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"embedded": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                           "intermediate_size": 64}},
    # dropout 0: each process draws its own dropout masks, which would make the runs differ by design.
    "train": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["norm"]}, "epochs": 2,
              "batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 0.003,
              "evals_per_epoch": 1, "early_stopping_patience": 0, "pack_tokens": 256},
}


def _train(world_size: int, rank: int, out: Path, packing: bool) -> None:
    from stages.core.chat import encode_example
    from stages.core.modeling import load_tokenizer
    from stages.core.params import validate_params
    from stages.core.training import DistInfo, fit, select_distributed, trainable_state
    from stages.train import build_model_hf

    torch.set_num_threads(1)
    raw = json.loads(json.dumps(TINY))
    raw["train"]["packing"] = packing
    params = validate_params(raw)
    tok = load_tokenizer("embedded")
    rows = [json.loads(line) for line in (ROOT / "data/raw/corporate_qa.jsonl").read_text().splitlines()[:14]]
    ex = [encode_example(tok, r["system"], r["instruction"], r["output"]) for r in rows]
    torch.manual_seed(params.train.seed)
    model = build_model_hf(params, torch.device("cpu"), torch.float32)
    info = DistInfo(rank=rank, world_size=world_size, device=torch.device("cpu"))
    result = fit(model, ex[:10], ex[10:], params.train, device=torch.device("cpu"), dist_info=info,
                 distributed=select_distributed("auto", "lora", world_size), log=lambda _m: None)
    if rank == 0:
        state = {k: v.tolist() for k, v in trainable_state(model).items() if "lora_B" in k}
        out.write_text(json.dumps({"history": result.history, "final_val": result.final_val_loss, "state": state}))


def _worker(rank: int, world_size: int, port: int, out: str, packing: bool) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _train(world_size, rank, Path(out), packing)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("packing", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_two_processes_match_one_process(tmp_path, packing):
    single = tmp_path / "single.json"
    _train(1, 0, single, packing)
    double = tmp_path / "ddp.json"
    mp.spawn(_worker, args=(2, _free_port(), str(double), packing), nprocs=2, join=True)
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert [h["step"] for h in one["history"]] == [h["step"] for h in two["history"]] == [3, 6]
    for a, b in zip(one["history"], two["history"]):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
        assert b["val/loss"] == pytest.approx(a["val/loss"], rel=1e-4)
    assert two["final_val"] == pytest.approx(one["final_val"], rel=1e-4)
    for name, value in one["state"].items():
        torch.testing.assert_close(torch.tensor(two["state"][name]), torch.tensor(value), rtol=1e-3, atol=1e-5)
